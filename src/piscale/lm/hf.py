"""A local transformers engine that never recomputes a prefix.

All live sequences sit in one key/value cache with one row per sequence and
a shared column axis; sequences of different lengths are left-aligned by an
attention mask (columns a row does not use are masked), and every row carries
its own position ids, so a row's computation is that of the sequence alone.

* ``open`` prefills each prompt once (all prompts of the call in one padded
  pass) and appends the rows to the cache; the ``copies`` handles of a prompt
  share that row until they diverge.
* ``fork`` only records which row each new handle copies. Before the next
  forward pass the cache is gathered once (``index_select`` on the row axis):
  resampled particles copy their ancestors' rows, released rows disappear.
* ``extend`` decodes token by token. The last token of every sequence is kept
  *pending* (sampled but not yet read by the model), so that each forward
  pass reads exactly one token per row: the first pass of a step reads the
  token that ended the previous step, and nothing is ever read twice.
* Concurrent ``extend`` calls (many prompts solved at once, or many server
  requests) join the same decoding loop between two forward passes: this is
  continuous batching at token granularity. Rows that are alive but not being
  extended ride along with a masked column.

Sampling draws from a ``torch.Generator`` per sequence and step, seeded by
the caller, so a sequence's tokens do not depend on its batch neighbours.

Forward passes (prefill, decoding, scoring) run on a worker thread, one at a
time, so that a long pass leaves the caller's event loop free: a server
answers its probes and takes in requests meanwhile. The cache layout and the
sequence table change only on the event loop, between passes; a fork or a
release during a pass only adds or drops a table entry, and rows move at the
next pass's compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from piscale.lm.base import Handle, ScoreOutput, StepOutput, StepParams, Stopwatch, Usage, find_stop
from piscale.lm.batching import Active, BatchingLM, Request
from piscale.lm.kv import check_cache_filled, output_cache, require_cache_argument
from piscale.lm.table import SequenceTable, check_open, check_score


@dataclass
class _Row:
    """A sequence: its tokens (the last one pending) and its cache row."""

    tokens: list[int]
    row: int
    busy: bool = False


class TransformersLM(BatchingLM):
    """A ``LanguageModel`` over a transformers causal LM, on CPU or CUDA.

    ``max_batch_tokens`` bounds the tokens of one prefill or scoring pass
    (long batches are split). ``name`` identifies the model in results.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        device: str | torch.device | None = None,
        name: str | None = None,
        max_batch_tokens: int = 8192,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        self.model.eval()
        self._cache_argument = require_cache_argument(self.model)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.max_batch_tokens = max_batch_tokens
        self.usage = Usage()
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
        )
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif source is not None:
                eos.update(source)
        self.eos_token_ids = frozenset(eos)
        vocab_size = getattr(model.config, "vocab_size", None)
        self.vocab_size = vocab_size if isinstance(vocab_size, int) else None
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (min(eos) if eos else 0)

        self._sequences: SequenceTable[_Row] = SequenceTable()
        self._cache = None  # a transformers DynamicCache, rows = sequences
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._rows = 0
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # Held by the worker thread for the length of a forward pass: a caller
        # cancelled while its pass runs gives up the asyncio lock at once, and
        # the next pass still waits for the model.
        self._model_lock = threading.Lock()
        self._waiting: list[Request] = []

    # -- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat(self, messages, *, add_generation_prompt=True, continue_final_message=False) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {self.name} has no chat template; pass token ids or a plain prompt instead"
            )
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
        )
        return self.encode(text)

    def _lock(self) -> asyncio.Lock:
        """The lock that serialises model calls and cache changes, one per
        event loop (a backend may be used from successive ``asyncio.run``
        calls)."""
        loop = asyncio.get_running_loop()
        if loop not in self._locks:
            self._locks = {loop: asyncio.Lock()}
        return self._locks[loop]

    def _attention_kernels(self):
        """On CUDA, keep attention off the cuDNN backend: it plans a kernel per
        shape, and a decoding cache changes shape at every token (measured on
        an H100: ~70 ms per pass with it, ~17 ms without, for a 1.5B model)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # -- bookkeeping --------------------------------------------------------
    def token_ids(self, handle: Handle) -> list[int]:
        return list(self._sequences.checked(handle).tokens)

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        return [self._sequences.add(_Row(list(p.tokens), p.row)) for p in self._sequences.to_fork(ancestors)]

    # -- cache layout -------------------------------------------------------
    def _layers(self):
        return self._cache.layers if self._cache is not None else []

    def _compact(self) -> None:
        """Give every live sequence its own cache row, in handle order.

        One gather per layer does all pending forks and releases at once."""
        live = list(self._sequences.items())
        index = [seq.row for _, seq in live]
        if index == list(range(self._rows)):
            return
        if not live:
            self._cache, self._rows = None, 0
            self._mask = self._mask[:0, :0]
            return
        rows = torch.tensor(index, device=self.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self._mask = self._mask.index_select(0, rows)
        # Columns no live row uses any more (e.g. left padding of released
        # long prompts) are dropped so the cache does not keep growing.
        used = self._mask.any(dim=0).nonzero()
        if used.numel() and int(used[0]) > 0:
            first = int(used[0])
            for layer in self._layers():
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self._mask = self._mask[:, first:]
        for new_row, (_, seq) in enumerate(live):
            seq.row = new_row
        self._rows = len(live)

    def _append_rows(self, cache, mask: torch.Tensor) -> int:
        """Append prefilled rows to the cache, left-padding whichever side is
        shorter along the column axis. Returns the first new row index."""
        self._compact()
        first_row = self._rows
        if self._cache is None:
            self._cache, self._mask = cache, mask
            self._rows = mask.shape[0]
            return first_row
        old_cols, new_cols = self._mask.shape[1], mask.shape[1]
        width = max(old_cols, new_cols)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._rows += mask.shape[0]
        return first_row

    # -- prefill ------------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        prompts, counts = check_open(prompts, copies, self.context_length)
        async with self._lock():
            self.usage.calls += 1
            with Stopwatch(self.usage):
                handles = []
                # All but the last token of each prompt are read now; the last
                # one stays pending and is read by the first decoding pass.
                for chunk in _chunks_by_tokens(prompts, self.max_batch_tokens):
                    cache, mask = await asyncio.to_thread(self._prefill, [p[:-1] for p in chunk])
                    self.usage.prefill_tokens += sum(len(p) - 1 for p in chunk)
                    self.usage.forward_passes += 1
                    first_row = self._append_rows(cache, mask)
                    handles.extend(first_row + offset for offset in range(len(chunk)))
                result = []
                for row, prompt, count in zip(handles, prompts, counts):
                    result.append([self._sequences.add(_Row(list(prompt), row)) for _ in range(count)])
                return result

    @torch.inference_mode()
    def _prefill(self, prefixes: list[list[int]]):
        """One forward pass over ``prefixes`` (worker thread): a new cache
        and its mask, for ``_append_rows`` to add on the event loop."""
        from transformers import DynamicCache

        # At least one column: a one-token prompt has nothing to read now,
        # and its row is a single masked column.
        width = max(1, max(len(p) for p in prefixes))
        ids = torch.full((len(prefixes), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            if prefix:
                ids[i, width - len(prefix) :] = torch.tensor(prefix)
                mask[i, width - len(prefix) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self._model_lock, self._attention_kernels():
            self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_argument: cache}
            )
        check_cache_filled(cache, width)
        return cache, mask

    # -- decoding -----------------------------------------------------------
    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        handles = list(handles)
        self._sequences.to_extend(handles, seeds)
        members = []
        for i, handle in enumerate(handles):
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(seeds[i]) if seeds is not None else int(torch.seed()))
            members.append(Active(handle, params, generator))
        if not members:
            return []
        return await self._submit(members)

    async def _decode_pass(self, members: list[Active]) -> None:
        async with self._lock():
            with Stopwatch(self.usage):
                inputs, by_row = self._decode_inputs(members)
                cache, row_index, chosen, logprobs = await asyncio.to_thread(self._decode_forward, inputs, by_row)
                self._decode_apply(cache, inputs["active_column"], by_row, row_index, chosen, logprobs)

    async def _between_passes(self) -> None:
        # Let other coroutines submit work before the next pass.
        await asyncio.sleep(0)

    @torch.inference_mode()
    def _decode_inputs(self, members: list[Active]) -> tuple[dict[str, torch.Tensor], dict[int, Active]]:
        """The inputs of one decoding pass (event loop): every row reads its
        pending token; the members' rows keep the new column afterwards."""
        self._compact()
        rows = self._rows
        by_row = {self._sequences[m.handle].row: m for m in members}
        ids = torch.full((rows, 1), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((rows, 1), dtype=torch.long)
        for seq in self._sequences.values():
            ids[seq.row, 0] = seq.tokens[-1]
            positions[seq.row, 0] = len(seq.tokens) - 1
        active_column = torch.zeros((rows, 1), dtype=torch.long)
        active_column[list(by_row), 0] = 1
        active_column = active_column.to(self.device)
        # Every row reads its new column during this pass (so no row attends
        # to nothing); only the extended rows keep it afterwards.
        inputs = {
            "input_ids": ids.to(self.device),
            "position_ids": positions.to(self.device),
            "attention_mask": torch.cat([self._mask, torch.ones_like(active_column)], dim=1),
            "cache_position": torch.tensor([self._mask.shape[1]], device=self.device),
            "active_column": active_column,
        }
        return inputs, by_row

    @torch.inference_mode()
    def _decode_forward(self, inputs: dict[str, torch.Tensor], by_row: dict[int, Active]):
        """The forward pass and the members' sampling (worker thread): the
        grown cache, and per member row its token and log-probability."""
        model_inputs = {name: value for name, value in inputs.items() if name != "active_column"}
        with self._model_lock, self._attention_kernels():
            out = self.model(**model_inputs, use_cache=True, **{self._cache_argument: self._cache})
            if not by_row:
                return output_cache(out), [], [], []
            row_index = torch.tensor(list(by_row), device=self.device)
            logits = out.logits[row_index, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            rows = row_index.tolist()
            chosen = self._sample(logits, [by_row[row] for row in rows])
            chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
            return output_cache(out), rows, chosen.tolist(), chosen_logprobs

    @torch.inference_mode()
    def _decode_apply(self, cache, active_column, by_row, rows, chosen, logprobs) -> None:
        """Keep the pass's cache and advance its members (event loop)."""
        self._cache = cache
        self._mask = torch.cat([self._mask, active_column], dim=1)
        self.usage.forward_passes += 1
        for row, token, logprob in zip(rows, chosen, logprobs):
            member = by_row[row]
            if member.error is not None:
                # Its sequence stays as it was: the column this pass wrote
                # for the row is masked out again.
                self._mask[row, -1] = 0
                continue
            self._advance(member, token, logprob)

    def _sample(self, logits: torch.Tensor, members: list[Active]) -> torch.Tensor:
        """The token of every member; a member whose sampling fails is
        failed alone (``Active.fail``) and its entry is meaningless."""
        chosen = logits.argmax(dim=-1)
        for i, member in enumerate(members):
            params = member.params
            if params.temperature == 0:
                continue
            try:
                probs = torch.softmax(logits[i] / params.temperature, dim=-1)
                if params.top_p < 1.0:
                    probs = _top_p_filter(probs, params.top_p)
                chosen[i] = torch.multinomial(probs, 1, generator=member.rng)[0]
            except Exception as error:
                member.fail(error)
        return chosen

    def _advance(self, member: Active, token: int, logprob: float) -> None:
        seq = self._sequences[member.handle]
        seq.tokens.append(token)
        member.new_tokens.append(token)
        member.logprobs.append(logprob)
        self.usage.generated_tokens += 1
        stops = member.params.stop
        if token in self.eos_token_ids:
            member.finish_reason = "eos"
        elif stops and self._ends_with_stop(member.new_tokens, stops):
            member.finish_reason = "stop"
        elif len(member.new_tokens) >= member.params.max_tokens:
            member.finish_reason = "length"
        elif len(seq.tokens) >= self.context_length:
            member.finish_reason = "context"
        if member.finish_reason is not None:
            member.text = self.decode(member.new_tokens)

    def _ends_with_stop(self, new_tokens: list[int], stops: Sequence[str]) -> bool:
        """Whether the newest token completes a stop string.

        Only the last few tokens are decoded (every token is at least one
        character, so a window one longer than the longest stop string holds
        any stop that the newest token completes): the hot loop never
        re-decodes the whole step."""
        window = max(len(s) for s in stops) + 1
        tail = new_tokens[-window:]
        text = self.decode(tail)
        newest = len(self.decode(tail[:-1]))
        return find_stop(text, stops, newest) is not None

    # -- scoring ------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        pairs = check_score(prompts, continuations, self.context_length)
        # Rows to evaluate: one per continuation of two or more tokens, and
        # one per distinct prompt for all its one-token continuations (the
        # prompt's last position predicts them all: a judge's Yes and No).
        rows: list[list[int]] = []
        wanted: list[list[tuple[int, int, list[int]]]] = []  # per row: (pair, start, continuation)
        prompt_rows: dict[tuple[int, ...], int] = {}
        results: list[ScoreOutput] = [ScoreOutput([], []) for _ in pairs]
        for index, (prompt, continuation) in enumerate(pairs):
            if not continuation:
                continue
            if len(continuation) == 1 and tuple(prompt) in prompt_rows:
                wanted[prompt_rows[tuple(prompt)]].append((index, len(prompt), continuation))
                continue
            if len(continuation) == 1:
                prompt_rows[tuple(prompt)] = len(rows)
                rows.append(prompt)
            else:
                rows.append(prompt + continuation[:-1])  # the last token is predicted, never read
            wanted.append([(index, len(prompt), continuation)])
        if not rows:
            return results
        async with self._lock():
            self.usage.calls += 1
            with Stopwatch(self.usage):
                order = _chunks_by_tokens(list(range(len(rows))), self.max_batch_tokens, size=lambda r: len(rows[r]))
                for chunk in order:
                    chunk_rows = [rows[r] for r in chunk]
                    scored = await asyncio.to_thread(self._score_rows, chunk_rows, [wanted[r] for r in chunk])
                    self.usage.forward_passes += 1
                    self.usage.scored_tokens += sum(len(row) for row in chunk_rows)
                    for index, output in scored:
                        results[index] = output
                return results

    @torch.inference_mode()
    def _score_rows(self, rows: list[list[int]], wanted) -> list[tuple[int, ScoreOutput]]:
        """One forward pass over ``rows`` (worker thread); for each row, the
        log-probability of each wanted continuation starting at its position."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with self._model_lock, self._attention_kernels():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        outputs = []
        for i, requests in enumerate(wanted):
            for index, start, continuation in requests:
                # The token at position j is predicted by the logits at j - 1.
                targets = torch.tensor(continuation, device=logprobs.device)
                picked = logprobs[i, start - 1 : start - 1 + len(continuation)].gather(1, targets[:, None])[:, 0]
                outputs.append((index, ScoreOutput(list(continuation), picked.tolist())))
        return outputs

    async def close(self) -> None:
        self._sequences.clear()
        self._cache, self._rows = None, 0
        self._mask = self._mask[:0, :0]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a [rows, heads, columns, dim] cache tensor on the left."""
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0
    filtered = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return filtered / filtered.sum()


def _chunks_by_tokens(items, max_tokens: int, size=len):
    """Split ``items`` into consecutive batches whose padded size stays under
    ``max_tokens`` (always at least one item per batch)."""
    batch, longest = [], 0
    for item in items:
        longest_if_added = max(longest, size(item))
        if batch and longest_if_added * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest_if_added = [], size(item)
        batch.append(item)
        longest = longest_if_added
    if batch:
        yield batch
