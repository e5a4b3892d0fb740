"""Process reward models (PRMs) through transformers, with incremental scoring.

A PRM reads the prompt and the steps of a partial answer, each step followed by
a *marker*, and gives one probability per marker: that the reasoning up to and
including that step is correct. Two families:

* **classification-head PRMs** (Qwen2.5-Math-PRM, Zhang et al. 2025): the chat
  text system + user + assistant, the assistant's steps each followed by the
  separator token ``<extra_0>``; a token-classification head gives two logits
  per position, and the score of step t is softmax(logits at the t-th
  separator)[positive class];
* **language-model PRMs** (Math-Shepherd, Wang et al. 2024): a causal LM reads
  "prompt step_1 ки\\nstep_2 ки ..." and the score of step t is
  P(good) / (P(good) + P(bad)) for two candidate next tokens (``+`` and ``-``)
  at the t-th tag, i.e. softmax over those two logits only.

**Token layout.** The input of a trajectory is built piece by piece:
the prompt prefix (chat template up to where the assistant's text begins, or
a format string), then for each step the tokens of the (stripped) step text
followed by the tokens of the marker. Pieces are tokenized separately, so the
layout of a prefix never depends on what follows; that is what lets a cached
prefix be reused exactly.

**Incremental scoring.** The model is causal: the output at position i depends
only on tokens 0..i. The key/value cache of a token sequence S therefore holds,
for every l <= |S|, the exact cache of S[:l]. The PRM keeps the caches of the
sequences it has read (least recently used first out, ``cache_tokens`` tokens
in all). For a new sequence it finds a stored one that shares a token prefix
with it, reuses that many cached positions, and reads only the rest; the
marker scores inside the shared prefix are taken from the stored sequence.
When a search extends a particle by one step, only the new step is read.
The stored sequence is found by exact lookups at step boundaries first (a
particle's parent), then by scanning the most recently used sequences.

**Batching.** Sequences of one call go through the model together: each row's
cached prefix is left-padded to the longest one and its new tokens are
right-padded; the attention mask hides the padding and explicit position ids
keep every row's positions true, so a row's scores do not depend on its batch.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from piscale.lm.base import Stopwatch, Usage
from piscale.lm.kv import cache_argument, check_cache_filled
from piscale.rewards.aggregate import STEP_JOINER
from piscale.rewards.base import Reward
from piscale.rewards.templates import fill, require_fields

_MARK = "PISCALEASSISTANTTEXTMARK"

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt the Qwen2.5-Math-PRM family was trained with."""


@dataclass
class _Stored:
    """A token sequence the PRM has read: its cache and its marker scores."""

    tokens: np.ndarray
    cache: torch.Tensor
    """Keys and values of every layer: [layers, 2, heads, len(tokens), head_dim]
    (one tensor, so that moving a sequence's cache is one copy, not two per layer)."""
    scores: dict[int, float]
    """marker position -> score."""


@dataclass
class _Job:
    tokens: np.ndarray
    markers: list[int]
    reuse: int = 0
    source: _Stored | None = None
    scores: dict[int, float] = field(default_factory=dict)


class TransformersPRM(Reward):
    """What both PRM families share: layout, cache, batching. Subclasses say
    how to read a score from the model's output at a marker."""

    scale = "probability"
    outcome_only = False
    scan_recent = 64
    """How many recently used sequences are searched for a shared prefix when
    no step boundary matches exactly."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        marker: str,
        step_joiner: str = "",
        system_prompt: str | None = None,
        prompt_format: str | None = None,
        cache_tokens: int = 32768,
        batch_tokens: int = 16384,
        name: str = "prm",
    ):
        if cache_tokens < 0:
            raise ValueError(f"cache_tokens must be >= 0, got {cache_tokens}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if prompt_format is not None:
            require_fields(prompt_format, "prompt", what="prompt_format")
        if prompt_format is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; pass prompt_format (e.g. '{prompt}\\n') "
                "to say how the problem is laid out before the steps"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.system_prompt = system_prompt
        self.prompt_format = prompt_format
        self.step_joiner = step_joiner
        self.marker_ids = self._encode(marker)
        if not self.marker_ids:
            raise ValueError(f"the marker {marker!r} encodes to no tokens")
        self.cache_tokens = cache_tokens
        self.batch_tokens = batch_tokens
        self.name = name
        self.usage = Usage()
        self.tokens_reused = 0
        """Cached positions reused instead of read (the saving of incremental scoring)."""
        self._stored: OrderedDict[bytes, _Stored] = OrderedDict()
        self._stored_tokens = 0
        self._prefixes: OrderedDict[str, list[int]] = OrderedDict()
        # asyncio locks belong to one event loop; keep one per loop so the PRM
        # works across asyncio.run calls.
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        parameters = inspect.signature(model.forward).parameters
        # Incremental scoring needs a model that takes and fills a KV cache.
        self._cache_argument = cache_argument(model)
        self.caching = self._cache_argument is not None and cache_tokens > 0
        """Whether scoring reuses cached prefixes (incremental) or reads every
        trajectory whole."""
        if self._cache_argument is None and cache_tokens > 0:
            warnings.warn(
                f"{name}: {type(model).__name__} takes no key/value cache, so every call reads each "
                "trajectory from its first token (usage.scored_tokens grows with the square of the "
                "number of steps); pass cache_tokens=0 to say this is intended",
                RuntimeWarning,
                stacklevel=2,
            )
        self._keeps_logits = "logits_to_keep" in parameters
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- layout ---------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        """Tokens of everything before the first step."""
        if prompt in self._prefixes:
            self._prefixes.move_to_end(prompt)
            return self._prefixes[prompt]
        if self.prompt_format is not None:
            text = fill(self.prompt_format, prompt=prompt, system=self.system_prompt or "")
            ids = self._encode_with_leading_specials(text)
        else:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _MARK}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            if _MARK not in text:
                raise ValueError("the chat template drops the assistant's message; pass prompt_format instead")
            ids = self._encode(text[: text.index(_MARK)])
        self._prefixes[prompt] = ids
        while len(self._prefixes) > 256:
            self._prefixes.popitem(last=False)
        return ids

    def _encode_with_leading_specials(self, text: str) -> list[int]:
        """``text`` with the special tokens the tokenizer puts *before* a text
        (a BOS), but none after it: more text follows."""
        plain = self._encode(text)
        full = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start] + plain
        return plain

    def layout(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """The token ids the PRM reads for a trajectory, and the marker
        positions whose outputs give the step scores."""
        tokens = list(self.prompt_ids(prompt))
        markers = []
        for t, step in enumerate(steps):
            tokens += self._encode((self.step_joiner if t else "") + step.strip())
            tokens += self.marker_ids
            markers.append(len(tokens) - 1)
        return tokens, markers

    # -- reading scores ---------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, keep):
        """Model outputs at the positions ``keep`` of the new tokens: [B, K, C]."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if cache is not None:
            kwargs.update({self._cache_argument: cache, "use_cache": True})
        if self._keeps_logits:
            kwargs["logits_to_keep"] = keep
            return self.model(**kwargs).logits
        return self.model(**kwargs).logits[:, keep]

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Step scores from the outputs at markers: [..., C] -> [...]."""
        raise NotImplementedError

    # -- the cache ---------------------------------------------------------------
    def _plan(self, prompt: str, steps: Sequence[str]) -> _Job:
        tokens, markers = self.layout(prompt, steps)
        job = _Job(np.asarray(tokens, dtype=np.int64), markers)
        if not self.caching:
            return job
        best, best_length = self._find_prefix(job.tokens, markers, self._joined_parent(prompt, steps))
        if best is None:
            return job
        reuse = best_length
        for position in markers:
            if position >= reuse:
                break
            if position in best.scores:
                job.scores[position] = best.scores[position]
            else:
                # A marker the stored sequence had no score for: read from here on.
                reuse = position
                break
        job.scores = {p: s for p, s in job.scores.items() if p < reuse}
        job.reuse, job.source = reuse, best
        self._stored.move_to_end(best.tokens.tobytes())
        return job

    def _find_prefix(
        self, tokens: np.ndarray, markers: list[int], guesses: Sequence[np.ndarray] = ()
    ) -> tuple[_Stored | None, int]:
        """A stored sequence sharing a prefix with ``tokens``, and the length
        of that prefix.

        First exact lookups, one dictionary probe each: the sequence itself,
        its prefixes at step boundaries (newest first: a particle's parent,
        or an earlier copy of the particle), and the ``guesses`` (the previous
        partial answer when steps are joined into one step). Failing that,
        the longest common token prefix among the ``scan_recent`` most
        recently used sequences."""
        for end in dict.fromkeys([len(tokens), *(position + 1 for position in reversed(markers))]):
            stored = self._stored.get(tokens[:end].tobytes())
            if stored is not None:
                return stored, end
        candidates = [self._stored.get(guess.tobytes()) for guess in guesses]
        scanned = itertools.islice(reversed(self._stored.values()), self.scan_recent)
        found = [c for c in candidates if c is not None]
        best, best_length = None, 0
        for stored in found or scanned:
            n = min(len(stored.tokens), len(tokens))
            if n <= best_length:
                continue
            same = stored.tokens[:n] == tokens[:n]
            length = n if bool(same.all()) else int(np.argmin(same))
            if length > best_length:
                best, best_length = stored, length
        return best, best_length

    def _joined_parent(self, prompt: str, steps: Sequence[str]) -> list[np.ndarray]:
        """For one step made of several blank-line separated parts (steps
        joined by ``model`` aggregation), the layout of the same text without
        its last part: what the PRM most likely read at the previous step."""
        if len(steps) != 1:
            return []
        text = steps[0].strip()
        cut = text.rfind(STEP_JOINER)
        if cut <= 0:
            return []
        tokens, _ = self.layout(prompt, [text[:cut]])
        return [np.asarray(tokens, dtype=np.int64)]

    def _store(self, stored: _Stored) -> None:
        if not self.caching or len(stored.tokens) > self.cache_tokens:
            return
        key = stored.tokens.tobytes()
        if key in self._stored:
            self._stored_tokens -= len(self._stored.pop(key).tokens)
        self._stored[key] = stored
        self._stored_tokens += len(stored.tokens)
        while self._stored_tokens > self.cache_tokens:
            _, evicted = self._stored.popitem(last=False)
            self._stored_tokens -= len(evicted.tokens)

    def clear_cache(self) -> None:
        """Forget every cached sequence."""
        self._stored.clear()
        self._stored_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return self._stored_tokens

    # -- scoring -------------------------------------------------------------------
    async def score(self, prompts, trajectories) -> list[list[float]]:
        if len(prompts) != len(trajectories):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(trajectories)} trajectories; they must pair up"
            )
        for steps in trajectories:
            if isinstance(steps, str):
                raise TypeError("each trajectory must be a list of step strings, not a string")
        loop = asyncio.get_running_loop()
        lock = self._locks.setdefault(loop, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(self._score_sync, list(prompts), [list(s) for s in trajectories])

    def _score_sync(self, prompts: list[str], trajectories: list[list[str]]) -> list[list[float]]:
        self.usage.calls += 1
        with Stopwatch(self.usage):
            jobs = [self._plan(prompt, steps) for prompt, steps in zip(prompts, trajectories)]
            pending = [job for job in jobs if any(p not in job.scores for p in job.markers)]
            for batch in self._batches(pending):
                self._run(batch)
        return [[job.scores[p] for p in job.markers] for job in jobs]

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Groups whose padded size (rows x longest row) fits ``batch_tokens``."""
        ordered = sorted(jobs, key=lambda job: len(job.tokens), reverse=True)
        batches: list[list[_Job]] = []
        for job in ordered:
            # Sorted longest first, so a batch's first row sets its padded width.
            if batches and (len(batches[-1]) + 1) * len(batches[-1][0].tokens) <= self.batch_tokens:
                batches[-1].append(job)
            else:
                batches.append([job])
        return batches

    @torch.inference_mode()
    def _run(self, jobs: list[_Job]) -> None:
        from transformers import DynamicCache

        device = self.device
        cached = [job.reuse for job in jobs]
        fresh = [len(job.tokens) - job.reuse for job in jobs]
        width_cached, width_new = max(cached), max(fresh)
        rows = len(jobs)

        input_ids = torch.full((rows, width_new), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, width_cached + width_new), dtype=torch.long)
        positions = torch.zeros((rows, width_new), dtype=torch.long)
        for i, job in enumerate(jobs):
            input_ids[i, : fresh[i]] = torch.from_numpy(job.tokens[job.reuse :])
            attention[i, width_cached - cached[i] : width_cached + fresh[i]] = 1
            positions[i] = torch.arange(cached[i], cached[i] + width_new)

        cache = None
        if self.caching:
            cache = DynamicCache(self._padded_past(jobs, width_cached)) if width_cached else DynamicCache()

        wanted = sorted({p - job.reuse for job in jobs for p in job.markers if p >= job.reuse})
        keep = torch.tensor(wanted, dtype=torch.long, device=device)
        logits = self._forward(
            input_ids.to(device), attention.to(device), positions.to(device), cache, keep
        )
        probabilities = self._probabilities(logits.float()).cpu()
        column = {p: k for k, p in enumerate(wanted)}

        self.usage.forward_passes += 1
        self.usage.scored_tokens += sum(fresh)
        self.tokens_reused += sum(cached)

        everything = None
        if cache is not None:
            check_cache_filled(cache, width_cached + width_new)
            flat = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
            everything = torch.stack(flat).unflatten(0, (len(cache.layers), 2))
        for i, job in enumerate(jobs):
            for p in job.markers:
                if p >= job.reuse:
                    job.scores[p] = float(probabilities[i, column[p - job.reuse]])
            if everything is None:
                continue
            row_cache = self._row_cache(everything, i, width_cached - job.reuse, width_cached + fresh[i])
            self._store(_Stored(job.tokens, row_cache, dict(job.scores)))

    @staticmethod
    def _row_cache(everything: torch.Tensor, row: int, start: int, end: int) -> torch.Tensor:
        """One row's real positions of the batch's cache [layers, 2, rows, heads, width, dim]."""
        if everything.shape[2] == 1 and start == 0 and end == everything.shape[4]:
            return everything[:, :, 0]  # a fresh tensor holding exactly this row
        return everything[:, :, row, :, start:end].clone()

    @staticmethod
    def _padded_past(jobs: list[_Job], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row's reused cache, left-padded with zeros to ``width``, as
        (keys, values) per layer."""
        if len(jobs) == 1:
            past = jobs[0].source.cache[:, :, None, :, : jobs[0].reuse]
        else:
            template = next(job.source.cache for job in jobs if job.source is not None and job.reuse > 0)
            layers, _, heads, _, dim = template.shape
            past = template.new_zeros((layers, 2, len(jobs), heads, width, dim))
            for i, job in enumerate(jobs):
                if job.reuse:
                    past[:, :, i, :, width - job.reuse :] = job.source.cache[:, :, :, : job.reuse]
        return [(layer[0], layer[1]) for layer in past]

    async def close(self) -> None:
        self.clear_cache()


class ClassificationPRM(TransformersPRM):
    """A PRM with a token-classification head read at a step separator (the
    Qwen2.5-Math-PRM family). ``positive_label`` is the class meaning "correct"."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        separator: str = "<extra_0>",
        positive_label: int = 1,
        system_prompt: str | None = QWEN_PRM_SYSTEM,
        prompt_format: str | None = None,
        cache_tokens: int = 32768,
        batch_tokens: int = 16384,
        name: str = "prm",
    ):
        labels = getattr(model.config, "num_labels", None)
        if labels is not None and not 0 <= positive_label < labels:
            raise ValueError(f"positive_label {positive_label} is not one of the model's {labels} classes")
        separator_ids = list(tokenizer(separator, add_special_tokens=False)["input_ids"])
        if len(separator_ids) != 1:
            raise ValueError(
                f"the step separator {separator!r} must be one token of the tokenizer, "
                f"it encodes to {len(separator_ids)} tokens"
            )
        super().__init__(
            model,
            tokenizer,
            marker=separator,
            step_joiner="",
            system_prompt=system_prompt,
            prompt_format=prompt_format,
            cache_tokens=cache_tokens,
            batch_tokens=batch_tokens,
            name=name,
        )
        self.positive_label = positive_label

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)[..., self.positive_label]


class TagPRM(TransformersPRM):
    """A causal-LM PRM that rates each step by its next-token distribution
    after a step tag (the Math-Shepherd family): score = P(good) / (P(good) + P(bad))."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        step_tag: str = " ки",
        good_token: str | int = "+",
        bad_token: str | int = "-",
        step_joiner: str = "\n",
        prompt_format: str | None = "{prompt} ",
        system_prompt: str | None = None,
        cache_tokens: int = 32768,
        batch_tokens: int = 16384,
        name: str = "prm",
    ):
        super().__init__(
            model,
            tokenizer,
            marker=step_tag,
            step_joiner=step_joiner,
            system_prompt=system_prompt,
            prompt_format=prompt_format,
            cache_tokens=cache_tokens,
            batch_tokens=batch_tokens,
            name=name,
        )
        self.good_id = self._token_id(good_token, "good_token")
        self.bad_id = self._token_id(bad_token, "bad_token")
        if self.good_id == self.bad_id:
            raise ValueError("good_token and bad_token are the same token")

    def _token_id(self, token: str | int, what: str) -> int:
        if isinstance(token, int):
            return token
        ids = self._encode(token)
        if len(ids) != 1:
            raise ValueError(
                f"{what} {token!r} encodes to {len(ids)} tokens; pass the token id as an int instead"
            )
        return ids[0]

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        pair = torch.stack([logits[..., self.good_id], logits[..., self.bad_id]], dim=-1)
        return torch.softmax(pair, dim=-1)[..., 0]


def _loadable_class(config, auto_names: Sequence[str]) -> str | None:
    """The auto-map class that would run the checkpoint's own code, if any."""
    auto_map = getattr(config, "auto_map", None) or {}
    for name in auto_names:
        if name in auto_map:
            return name
    return None


def load_prm(
    path: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    **options,
) -> TransformersPRM:
    """A PRM from a local folder or hub id: a causal-LM config becomes a
    ``TagPRM``, anything else a ``ClassificationPRM``.

    Checkpoints whose head is custom code (Qwen2.5-Math-PRM's
    ``Qwen2ForProcessRewardModel``) load only with ``trust_remote_code=True``;
    without it, loading stops with an error instead of silently putting a
    randomly initialised head on the model. ``dtype`` defaults to bfloat16 on
    CUDA and float32 on the CPU.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        names = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
        dtype = names[dtype]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    custom = [a for a in architectures if not hasattr(transformers, a)]
    if custom and not trust_remote_code:
        raise ValueError(
            f"{path}: the architecture {custom[0]} is not part of transformers, it needs the "
            "checkpoint's own code; pass trust_remote_code=True if you trust that code"
        )
    kwargs = dict(trust_remote_code=trust_remote_code, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if causal:
        loader = AutoModelForCausalLM
    elif custom:
        name = _loadable_class(config, ("AutoModelForTokenClassification", "AutoModel"))
        if name is None:
            raise ValueError(f"{path}: {custom[0]} has no auto_map entry to load it with")
        loader = getattr(transformers, name)
    else:
        loader = AutoModelForTokenClassification
    model, info = loader.from_pretrained(path, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
    if missing:
        raise ValueError(
            f"{path}: these weights are missing from the checkpoint, the PRM would be random: "
            f"{', '.join(sorted(missing)[:5])}"
        )
    model = model.to(device).eval()
    if causal:
        return TagPRM(model, tokenizer, **options)
    return ClassificationPRM(model, tokenizer, **options)
