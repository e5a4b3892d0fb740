"""Language-model backends behind one protocol (``piscale.lm.base``).

``load(spec)`` builds a backend from a model spec: a catalog name, a ``.gguf``
file, a local folder, a hub id, or ``toy`` (the exact toy model used in tests
and demos). ``engine`` picks the backend: ``hf`` (transformers, CPU or CUDA),
``llamacpp`` (native GGUF on CPU, the ``piscale[llamacpp]`` extra), ``vllm``
(vLLM in this process; vLLM installed apart, see docs/serving.md), ``openai``
(any OpenAI-compatible server: ``openai:MODEL@URL``), or ``auto``.
"""

from __future__ import annotations

import logging

from piscale.lm.base import Handle, LanguageModel, ScoreOutput, StepOutput, StepParams, Usage

__all__ = ["Handle", "LanguageModel", "ScoreOutput", "StepOutput", "StepParams", "Usage", "load", "pick_engine"]

ENGINES = ("auto", "hf", "llamacpp", "vllm", "openai")
log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _llamacpp_available() -> bool:
    try:
        from piscale.lm import llamacpp
    except ImportError:
        return False
    return llamacpp.available()


def pick_engine(spec: str, engine: str = "auto", device: str | None = None) -> str:
    """The engine ``load`` uses for ``spec``: llama.cpp for GGUF models on a
    machine without a GPU when the extra is installed, transformers otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if spec.startswith("openai:"):
        return "openai"
    if spec == "toy":
        return "toy"
    wants_gpu = (device or "").startswith("cuda") or (device is None and _cuda_available())
    if not wants_gpu and _is_gguf(spec) and _llamacpp_available():
        return "llamacpp"
    return "hf"


def _is_gguf(spec: str) -> bool:
    from piscale import models

    try:
        return models.resolve(spec, download=False).gguf_file is not None
    except Exception:
        return spec.endswith(".gguf")


def load(spec: str, *, engine: str = "auto", device: str | None = None, dtype: str | None = None, **options) -> LanguageModel:
    """A backend for ``spec``; see the module docstring."""
    chosen = pick_engine(spec, engine, device)
    log.info("model %s: engine %s", spec, chosen)
    if chosen == "toy":
        from piscale.lm.toy import ToyLM

        return ToyLM(**options)
    if chosen == "openai":
        from piscale.lm.openai import OpenAILM

        return OpenAILM.from_spec(spec, **options)
    if chosen == "llamacpp":
        from piscale.lm.llamacpp import LlamaCppLM

        return LlamaCppLM.from_spec(spec, **options)
    if chosen == "vllm":
        from piscale.lm.vllm import VLLMLM, vllm_available

        if not vllm_available():
            raise ImportError("the vllm engine needs vLLM installed in this environment (see docs/serving.md)")
        return VLLMLM.from_spec(spec, dtype=dtype, **options)
    from piscale.lm.hf import TransformersLM
    from piscale.models import load_transformers

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_transformers(spec, device=device, dtype=dtype)
    return TransformersLM(model, tokenizer, device=device, name=spec, **options)
