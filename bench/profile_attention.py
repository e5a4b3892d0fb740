"""Time one decoding forward pass under different call conventions.

    python bench/profile_attention.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from bench_engine import _sync, build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-cudnn", action="store_true", help="disable the cuDNN attention backend")
    args = parser.parse_args()
    model, _ = build(args.model, args.device, args.dtype)
    device = torch.device(args.device)
    batch, context = args.batch, 100
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)

    offset = [0]

    def variant(name, mask_kind, with_positions, with_cache_position, steps=20):
        # Each variant decodes at cache lengths never seen before, as a real
        # decoding loop does (kernels that plan per shape pay every time).
        offset[0] += steps + 1
        prompt = torch.randint(1000, 2000, (batch, context + offset[0]), device=device)
        length0 = prompt.shape[1]
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            token = torch.ones((batch, 1), dtype=torch.long, device=device)
            _sync()
            start = time.perf_counter()
            for step in range(steps):
                length = length0 + step + 1
                kwargs = {}
                if mask_kind == "ones":
                    kwargs["attention_mask"] = torch.ones((batch, length), dtype=torch.long, device=device)
                if mask_kind == "bool":
                    kwargs["attention_mask"] = torch.ones((batch, length), dtype=torch.bool, device=device)
                if with_positions:
                    kwargs["position_ids"] = torch.full((batch, 1), length - 1, device=device)
                if with_cache_position:
                    kwargs["cache_position"] = torch.tensor([length - 1], device=device)
                model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
            _sync()
        print(f"{name:40s} {(time.perf_counter() - start) / steps * 1000:.2f} ms/pass")

    variant("warmup", None, False, False)
    variant("no mask", None, False, False)
    variant("mask", "ones", False, False)
    variant("mask+positions", "ones", True, False)
    variant("mask+positions+cache_position", "ones", True, True)
    variant("bool mask+positions+cache_position", "bool", True, True)
    variant("positions+cache_position", None, True, True)


if __name__ == "__main__":
    main()
