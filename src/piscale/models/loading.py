"""Loading any model spec with transformers: its tokenizer, or the model
and tokenizer. GGUF weights are de-quantised once and the result is kept
under ``$PISCALE_HOME/converted/`` so that later loads take seconds."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from piscale.models.cache import _exclusive_lock, _write_atomically, piscale_home
from piscale.models.errors import ModelError
from piscale.models.pulling import Progress
from piscale.models.specs import ResolvedModel, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def load_tokenizer(
    spec: str | os.PathLike[str], *, home: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of any spec, with its chat template: read
    from the GGUF metadata for a GGUF model (no weights are loaded)."""
    from transformers import AutoTokenizer

    resolved = resolve(spec, home=home)
    if resolved.kind == "hub":
        return AutoTokenizer.from_pretrained(resolved.hub_id or resolved.spec, revision=resolved.revision)
    if resolved.gguf_file is None:
        return AutoTokenizer.from_pretrained(resolved.path)
    return AutoTokenizer.from_pretrained(resolved.gguf_file.parent, gguf_file=resolved.gguf_file.name)


DTYPES = ("float32", "bfloat16", "float16")


def converted_path(
    resolved: ResolvedModel, dtype: str, *, home: str | os.PathLike[str] | None = None
) -> Path:
    """Where the de-quantised copy of a GGUF model is kept."""
    if resolved.sha256 is None:
        raise ModelError(f"{resolved.spec!r} is not a GGUF model; it needs no conversion")
    return piscale_home(home) / "converted" / f"{resolved.sha256[:16]}-{dtype}"


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import torch

    return getattr(torch, dtype)


def bfloat16_is_native(device: str) -> bool:
    """Whether ``device`` computes in bfloat16 natively. Every GPU torch
    supports does; a CPU needs AVX512-BF16 or AMX, and without them torch
    emulates bfloat16 matrix products: a 0.5B model read 400 tokens in 45 s
    in bfloat16 against 5.8 s in float32 on one AVX2 core."""
    if not device.startswith("cpu"):
        return True
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def serving_dtype(device: str, preferred: str = "bfloat16") -> str:
    """The dtype to run a model in on ``device``: ``preferred``, except that
    bfloat16 becomes float32 where the device only emulates it (see
    ``bfloat16_is_native``). Scores move by about 0.01 between the two."""
    if preferred == "bfloat16" and not bfloat16_is_native(device):
        return "float32"
    return preferred


def _convert_gguf(
    resolved: ResolvedModel, torch_dtype: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file into a dense transformers model (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert resolved.gguf_file is not None
    folder, name = resolved.gguf_file.parent, resolved.gguf_file.name
    options: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        # Recent transformers can keep GGUF blocks packed when a kernel is
        # installed; a cached dense copy is the point here, so ask for that.
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype, **options)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
        if packed:
            raise ModelError(
                f"transformers kept {len(packed)} weights of {resolved.spec!r} packed "
                f"(e.g. {packed[0]}); cannot cache a dense copy"
            )
        # The weights are plain tensors already; the leftover GGUF quantizer
        # only stops save_pretrained from writing them.
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _finish(model: Any, tokenizer: Any, device: str) -> tuple[Any, Any]:
    """Shared last steps: a pad token for batching, eval mode, the device."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model.to(device), tokenizer


def load_transformers(
    spec: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    home: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A transformers causal LM and its tokenizer for any spec, in eval mode
    on ``device``, with a pad token.

    GGUF models are de-quantised on first load and the dense copy is saved
    (safetensors, with the tokenizer and its chat template) under
    ``$PISCALE_HOME/converted/<sha256[:16]>-<dtype>/``; later loads read that.
    """
    torch_dtype = _torch_dtype(dtype)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve(spec, home=home, progress=progress)
    if resolved.kind == "hub":
        source = resolved.hub_id or resolved.spec
        tokenizer = AutoTokenizer.from_pretrained(source, revision=resolved.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=resolved.revision, dtype=torch_dtype)
        return _finish(model, tokenizer, device)
    if resolved.kind == "folder":
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype)
        return _finish(model, tokenizer, device)

    target = converted_path(resolved, dtype, home=home)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not target.is_dir():
            model, tokenizer = _convert_gguf(resolved, torch_dtype)
            work = Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=target.parent))
            try:
                model.save_pretrained(work)
                tokenizer.save_pretrained(work)
                _write_atomically(
                    work / "piscale-source.json",
                    json.dumps(
                        {
                            "spec": resolved.spec,
                            "identity": resolved.identity,
                            "dtype": dtype,
                            "transformers": transformers.__version__,
                        }
                    ),
                )
                os.chmod(work, 0o755)  # mkdtemp makes folders private; the cache is not
                # A whole folder appears at once: a reader never sees half a copy.
                os.rename(work, target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return _finish(model, tokenizer, device)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
    return _finish(model, tokenizer, device)
