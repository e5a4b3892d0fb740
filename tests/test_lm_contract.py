"""The backend contract, one suite for every engine.

The checks are ``piscale.lm.testing``'s, so that a backend written elsewhere
runs the same ones. Each engine case here gives a backend plus two references
computed *another way* than through the engine's step/fork machinery: an
unforked greedy generation of the whole lineage, and the per-token
log-probabilities of a full forward pass over a finished sequence. Engines
that share this suite may differ in everything else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from piscale.lm.testing import CHECKS, EngineCase
from tiny_models import tiny_causal_lm


def transformers_case(model, tokenizer) -> EngineCase:
    from piscale.lm.hf import TransformersLM

    def greedy(prompt: list[int], n: int) -> list[int]:
        config = copy.deepcopy(model.generation_config)
        config.eos_token_id = None  # a lineage runs on past EOS in these tests
        config.pad_token_id = tokenizer.pad_token_id
        config.max_new_tokens, config.do_sample = n, False
        with torch.inference_mode():
            return model.generate(torch.tensor([prompt], device=model.device), generation_config=config)[0].tolist()

    def logprobs(ids: list[int], prompt_length: int) -> list[float]:
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
        table = torch.log_softmax(logits, dim=-1)
        return [float(table[j - 1, ids[j]]) for j in range(prompt_length, len(ids))]

    return EngineCase(TransformersLM(model, tokenizer), greedy, logprobs)


def _tiny(architecture: str, device: str = "cpu") -> EngineCase:
    model, tokenizer = tiny_causal_lm(architecture)
    return transformers_case(model.to(device), tokenizer)


def _tiny_cuda() -> EngineCase:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return _tiny("llama", "cuda")


def _default_model() -> EngineCase:
    from piscale.models import SMALL_MODEL, load_transformers

    model, tokenizer = load_transformers(SMALL_MODEL, device="cpu", dtype="float32")
    return transformers_case(model, tokenizer)


def _llamacpp_default_model() -> EngineCase:
    """The llama.cpp engine, referenced by llama.cpp's high-level API: one
    full evaluation keeping every logit, and a plain greedy loop."""
    from piscale.lm.llamacpp import LlamaCppLM, available

    if not available():
        pytest.skip("llama-cpp-python is not installed")
    import llama_cpp
    import numpy as np

    from piscale.models import SMALL_MODEL, gguf_path

    path = str(gguf_path(SMALL_MODEL))
    # 32 tokens per pass, as the engine reads: llama.cpp uses another attention
    # kernel from 64 query tokens on, and its logits differ slightly.
    reference = llama_cpp.Llama(
        model_path=path, n_ctx=2048, n_batch=32, n_ubatch=32, logits_all=True, flash_attn=True, verbose=False
    )

    def greedy(prompt: list[int], n: int) -> list[int]:
        reference.reset()
        ids = list(prompt)
        reference.eval(ids)
        for _ in range(n):
            ids.append(int(np.argmax(reference.scores[reference.n_tokens - 1])))
            reference.eval(ids[-1:])
        return ids

    def logprobs(ids: list[int], prompt_length: int) -> list[float]:
        reference.reset()
        reference.eval(ids)
        logits = np.asarray(reference.scores[: len(ids)], dtype=np.float64)
        table = logits - logits.max(axis=1, keepdims=True)
        table -= np.log(np.exp(table).sum(axis=1, keepdims=True))
        return [float(table[j - 1, ids[j]]) for j in range(prompt_length, len(ids))]

    return EngineCase(LlamaCppLM(path, context_length=1024, max_sequences=16), greedy, logprobs)


ENGINE_CASES: dict[str, Callable[[], EngineCase]] = {
    "hf-llama": lambda: _tiny("llama"),
    "hf-qwen2": lambda: _tiny("qwen2"),
    "hf-llama-cuda": _tiny_cuda,
    "hf-smollm2": _default_model,
    "llamacpp-smollm2": _llamacpp_default_model,
}
SLOW_CASES = {"hf-smollm2", "llamacpp-smollm2"}


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else []) for name in ENGINE_CASES],
)
def case(request) -> EngineCase:
    return ENGINE_CASES[request.param]()


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__.removeprefix("check_") for check in CHECKS])
async def test_contract(case: EngineCase, check) -> None:
    await check(case)
