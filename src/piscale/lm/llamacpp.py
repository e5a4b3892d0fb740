"""A native llama.cpp engine: GGUF models on the CPU, particles as sequence ids.

llama.cpp keeps key/value caches for up to ``n_seq_max`` *sequence ids*; a
batch may mix tokens of many sequence ids, and ``seq_cp`` / ``seq_rm`` copy
or clear a sequence's cache. That makes particle search cheap:

* a *slot* is one sequence id and the cache it holds. Handles point at slots
  and a slot may be shared by several handles whose cached tokens are the
  same (copy on write): ``open`` reads each prompt once into one slot that
  all its copies share, and ``fork`` only adds a holder to the ancestor's
  slot. A fork therefore costs no prefill and no copy;
* a handle that is about to be decoded while its slot is shared first gets a
  slot of its own by ``seq_cp`` (a copy of cache memory, never a re-read).
  After resampling the search releases the old generation, so most children
  are the sole holder of their ancestor's slot by then, and only ancestors
  drawn more than once are copied;
* ``release`` drops a holder; the last one clears the slot (``seq_rm``) and
  its sequence id is reused.

By default every sequence id has a cache of its own (llama.cpp's non-unified
cache, ``context_length`` cells each). Attention of a sequence then reads
exactly its own cells, so its logits do not depend on what the other
sequences hold. They do depend slightly on how many rows a micro-batch has:
llama.cpp multiplies large micro-batches with other kernels, which round
differently (decoding 32 sequences as one micro-batch rather than 32 single
rows changed a sampled token within 24 tokens in 3 of them, at temperature
0.8). Small batches (the tests use four) match single-sequence decoding to
1e-4.

llama.cpp splits a batch into one micro-batch per run of consecutive sequence
ids, and a micro-batch of a few rows costs nearly what a full one does. So
before each pass the slots being decoded are moved onto consecutive ids
(``gather_slots``; a move copies one cache stream, about a millisecond, and
``plan_gather`` in ``piscale.lm.llamacpp_gather`` picks the fewest copies).
Without it, particles that finish a step at different times scatter the ids:
32 of 64 sequences decoded at 45 instead of 158 tokens/s
(``bench/bench_llamacpp.py --part scatter``, 2 threads).

With ``unified_cache=True`` all sequences share one pool of cells; copies
only tag cells, but the attention kernels see the whole pool, so logits move
at the 1e-2 level with the batch's composition and decoding slows as the
pool grows (measured; see docs/engines.md).

Decoding is token by token over one ``llama_batch`` that holds one token per
live sequence. A sampled token is *pending*: it is appended to the sequence
but not yet in the cache; the next pass feeds it. Right after ``open`` the
logits of the prompt's last position are kept, so the first token of every
copy is sampled without another pass.

Sampling is done in numpy from the logits, with a ``numpy.random.Generator``
per sequence and step seeded by the caller (``piscale.lm.llamacpp_sampling``).
Log-probabilities are log-softmax at temperature 1, whatever the sampling
temperature. Chat prompts come from the GGUF's chat template
(``piscale.lm.chat_template``).

Concurrent ``extend`` calls join one decoding loop between two passes
(continuous batching at token granularity); the passes run in a worker thread
so the event loop stays free for other work (rewards, HTTP), and one lock
serialises everything that touches the llama.cpp context.

The engine needs the optional ``llama-cpp-python`` package
(``pip install piscale[llamacpp]``); :func:`available` says whether it is
installed. The low-level API it uses has been renamed across versions
(``llama_memory_seq_*`` / ``llama_kv_self_seq_*`` / ``llama_kv_cache_seq_*``);
the names are resolved once at load time.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import importlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piscale.lm.base import Handle, ScoreOutput, StepOutput, StepParams, Stopwatch, Usage, find_stop
from piscale.lm.batching import Active, BatchingLM, Request
from piscale.lm.chat_template import render_chat_template
from piscale.lm.llamacpp_gather import plan_gather
from piscale.lm.llamacpp_sampling import log_softmax_at, sample_token
from piscale.lm.table import SequenceTable, check_open, check_score, check_vocabulary

__all__ = ["LlamaCppLM", "available", "render_chat_template", "resolve_model_path", "sample_token"]

# Logits rows llama.cpp may hand back from one pass are bounded so that its
# output buffer stays near 64 MiB even for 150k-token vocabularies (scoring
# asks for a row at every position).
_MAX_OUTPUT_FLOATS = 1 << 24


def available() -> bool:
    """Whether ``llama-cpp-python`` is installed and its library loads."""
    try:
        importlib.import_module("llama_cpp.llama_cpp")
    except Exception:  # ImportError, or OSError from a broken shared library
        return False
    return True


def _import_llama_cpp():
    try:
        return importlib.import_module("llama_cpp.llama_cpp")
    except ImportError as error:
        raise ImportError(
            "the llama.cpp engine needs llama-cpp-python: pip install 'piscale[llamacpp]' "
            "(or make setup EXTRAS=llamacpp); it compiles llama.cpp, which takes a few minutes"
        ) from error


# -- engine state ---------------------------------------------------------------


@dataclass
class _Slot:
    """A llama.cpp sequence id and the cache it holds, shared by ``holders``
    handles whose cached tokens are identical."""

    seq_id: int
    holders: int = 1


@dataclass
class _Sequence:
    """A particle: its tokens and the slot caching them.

    ``tokens[:n_cached]`` are in the slot's cache; the rest are pending (read
    by the next pass). ``next_logits`` holds the logits for the token after
    ``tokens`` when they are already known (right after ``open``)."""

    slot: _Slot
    tokens: list[int]
    n_cached: int
    next_logits: np.ndarray | None = None
    busy: bool = False


@dataclass
class _Feed:
    """Tokens of one sequence id for one decoding run, starting at position
    ``pos``. With ``all_outputs`` a logits row is produced at every token,
    otherwise only at the last one."""

    seq_id: int
    pos: int
    tokens: list[int]
    all_outputs: bool = False


OutputSink = Callable[[int, int, np.ndarray], None]
"""Receives (feed index, token index within the feed, logits row). The row is
a view into llama.cpp's buffer, valid only during the call."""


def _free_native(ll, model, ctx, batch) -> None:
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    free_model = getattr(ll, "llama_model_free", None) or ll.llama_free_model
    free_model(model)


def resolve_model_path(model: str | os.PathLike) -> Path:
    """The GGUF file of a spec: a path to one, or a catalog name (pulled on
    first use by ``piscale.models``)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    from piscale.models import gguf_path

    return Path(gguf_path(model))


class LlamaCppLM(BatchingLM):
    """A ``LanguageModel`` over a GGUF file run natively by llama.cpp.

    ``model`` is a path to a ``.gguf`` file or a catalog name (resolved by
    ``piscale.models.gguf_path``). Weights stay quantised.

    ``max_sequences`` is the number of cache slots: distinct sequences that
    can be cached at once (handles that share a slot count once; ``score``
    borrows slots while it runs). ``context_length`` is the most tokens one
    sequence may hold (capped by the model's training context); the cache has
    ``context_length * max_sequences`` cells, allocated up front.
    ``unified_cache`` pools the cells of all slots (see the module docstring).
    ``n_batch`` bounds the tokens of one pass and ``prefill_chunk`` the
    tokens of one sequence in one pass. llama.cpp reads 64 or more query
    tokens of a sequence with another attention kernel, whose logits differ
    from token-by-token decoding (by up to ~0.3 nats on a Q4 model); chunks
    below that keep prefill, scoring and decoding bit-identical, at some cost
    in prefill speed (raise it when that agreement does not matter).
    ``n_threads`` defaults to the CPUs this process may use. ``seed`` seeds
    sampling when ``extend`` is given no seeds. ``flash_attention`` selects
    llama.cpp's fused attention kernel, whose results do not depend on how a
    sequence's tokens are split into passes. ``verbose`` lets llama.cpp log to
    stderr. ``gather_slots`` moves the sequences of each pass onto
    consecutive sequence ids (see the module docstring; off only to measure
    what it buys).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        context_length: int = 2048,
        max_sequences: int = 16,
        unified_cache: bool = False,
        n_batch: int = 512,
        prefill_chunk: int = 32,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attention: bool = True,
        gather_slots: bool = True,
        seed: int = 0,
        name: str | None = None,
        verbose: bool = False,
    ):
        if context_length < 16:
            raise ValueError(f"context_length must be at least 16, got {context_length}")
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if not 1 <= prefill_chunk <= n_batch:
            raise ValueError(f"prefill_chunk must be between 1 and n_batch={n_batch}, got {prefill_chunk}")
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        ll = _import_llama_cpp()
        # Importing the package installs llama-cpp-python's log callback; its
        # logger decides what reaches stderr (the same switch ``Llama`` uses).
        importlib.import_module("llama_cpp")
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        limit = getattr(ll, "llama_max_parallel_sequences", None)
        if limit is not None and max_sequences > limit():
            raise ValueError(f"max_sequences={max_sequences} exceeds this llama.cpp build's limit of {limit()}")

        path = resolve_model_path(model)
        self.model_path = path
        self.name = name or (path.stem if Path(model).expanduser().is_file() else str(model))
        self._ll = ll
        ll.llama_backend_init()

        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        load = getattr(ll, "llama_model_load_from_file", None) or ll.llama_load_model_from_file
        self._model = load(str(path).encode("utf-8"), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        free_model = getattr(ll, "llama_model_free", None) or ll.llama_free_model
        train_ctx = getattr(ll, "llama_model_n_ctx_train", None) or ll.llama_n_ctx_train
        self.context_length = min(context_length, int(train_ctx(self._model)))

        context_params = ll.llama_context_default_params()
        context_params.n_ctx = self.context_length * max_sequences
        context_params.n_batch = n_batch
        context_params.n_ubatch = n_batch
        context_params.n_seq_max = max_sequences
        context_params.n_threads = n_threads
        context_params.n_threads_batch = n_threads
        fields = {f[0] for f in type(context_params)._fields_}
        if "kv_unified" in fields:
            context_params.kv_unified = unified_cache
        elif not unified_cache:
            raise ValueError("this llama-cpp-python has only a unified cache; pass unified_cache=True or upgrade it")
        if "flash_attn_type" in fields:
            context_params.flash_attn_type = 1 if flash_attention else 0
        elif "flash_attn" in fields:
            context_params.flash_attn = flash_attention
        if "no_perf" in fields:
            context_params.no_perf = True
        init = getattr(ll, "llama_init_from_model", None) or ll.llama_new_context_with_model
        self._ctx = init(self._model, context_params)
        if not self._ctx:
            free_model(self._model)
            raise RuntimeError(
                f"llama.cpp could not create a context of {context_params.n_ctx} cells "
                f"(context_length={self.context_length} x max_sequences={max_sequences}): lower one of them"
            )
        self._batch = ll.llama_batch_init(n_batch, 0, 1)
        self._finalizer = weakref.finalize(self, _free_native, ll, self._model, self._ctx, self._batch)

        self.n_ctx = int(ll.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.max_sequences = max_sequences
        self.unified_cache = unified_cache
        self.gather_slots = gather_slots and not unified_cache
        self.n_threads = n_threads
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.vocab_size = int(ll.llama_vocab_n_tokens(self._vocab))
        self._max_outputs = max(1, min(n_batch, _MAX_OUTPUT_FLOATS // self.vocab_size))
        self.eos_token_ids = frozenset(
            t for t in range(self.vocab_size) if ll.llama_vocab_is_eog(self._vocab, t)
        )
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.chat_template = self._metadata("tokenizer.chat_template")
        self._seq_copy, self._seq_remove = self._resolve_sequence_ops()

        self.usage = Usage()
        self.cache_copies = 0
        """How many times a slot's cache was copied for a diverging handle."""
        self.cache_moves = 0
        """How many times a slot was moved to another sequence id to keep a
        pass's ids consecutive."""
        self.seed = seed
        self._seed_source = np.random.default_rng(seed)
        self._sequences: SequenceTable[_Sequence] = SequenceTable(guard=self._check_open)
        self._free_ids = list(range(max_sequences))
        # The context lock is held by whoever calls into llama.cpp, for as long
        # as a pass or a scoring wave takes. The table lock guards the slot
        # table (handles, holders, free ids) and is only held for bookkeeping,
        # so fork and release, which run on the event loop, never wait for a
        # pass: a freed id's cells are cleared when the id is taken again.
        self._context_lock = threading.Lock()
        self._table_lock = threading.Lock()
        self._waiting: list[Request] = []

    @classmethod
    def from_spec(cls, spec: str | os.PathLike, **options: Any) -> LlamaCppLM:
        """The engine for a model spec (a ``.gguf`` path or a catalog name);
        ``options`` are the constructor's keyword arguments."""
        return cls(spec, **options)

    # -- native helpers -------------------------------------------------------
    def _resolve_sequence_ops(self):
        """Bind seq_cp/seq_rm under whichever names this version exports."""
        ll = self._ll
        if hasattr(ll, "llama_memory_seq_cp") and hasattr(ll, "llama_get_memory"):
            target, prefix = ll.llama_get_memory(self._ctx), "llama_memory_"
        elif hasattr(ll, "llama_kv_self_seq_cp"):
            target, prefix = self._ctx, "llama_kv_self_"
        else:
            target, prefix = self._ctx, "llama_kv_cache_"
        copy_fn, remove_fn = getattr(ll, prefix + "seq_cp"), getattr(ll, prefix + "seq_rm")

        def copy(source: int, destination: int) -> None:
            copy_fn(target, source, destination, -1, -1)

        def remove(seq_id: int, start: int = -1) -> None:
            remove_fn(target, seq_id, start, -1)

        return copy, remove

    def _metadata(self, key: str) -> str | None:
        size = 4096
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buffer, size)
            if n < 0:
                return None
            if n < size:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def _piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = self._ll.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = self._ll.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special)
            piece = buffer.raw[:n]
            self._pieces[key] = piece
        return piece

    def _tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (ctypes.c_int32 * capacity)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), out, capacity, False, parse_special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    # -- text -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token markup in it is read as text."""
        return self._tokenize(text, parse_special=False)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        token_ids = [int(t) for t in token_ids]
        check_vocabulary(token_ids, self.vocab_size, "decode input")
        return self._text(token_ids, special=not skip_special_tokens)

    def _text(self, token_ids: Sequence[int], special: bool = False) -> str:
        # Pieces are bytes: a character split across tokens only decodes once
        # all its bytes are there, so text is decoded from the joined bytes.
        return b"".join(self._piece(t, special) for t in token_ids).decode("utf-8", errors="replace")

    def chat(self, messages, *, add_generation_prompt=True, continue_final_message=False) -> list[int]:
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template in its GGUF metadata; pass token ids instead")
        ll = self._ll
        bos = ll.llama_vocab_bos(self._vocab)
        eos = ll.llama_vocab_eos(self._vocab)
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            bos_token=self._piece(bos, True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self._piece(eos, True).decode("utf-8", "replace") if eos >= 0 else "",
        )
        return self._tokenize(text, parse_special=True)

    # -- slots and handles (slot table changes hold the table lock) -------------
    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"the llama.cpp engine for {self.name} is closed")

    def _take_ids(self, count: int, what: str) -> list[int]:
        """Free sequence ids, their caches cleared (context lock held)."""
        with self._table_lock:
            if count > len(self._free_ids):
                raise RuntimeError(
                    f"{what} needs {count} cache slots but only {len(self._free_ids)} of {self.max_sequences} "
                    "are free: release finished handles, or construct LlamaCppLM with a larger max_sequences"
                )
            self._free_ids.sort()
            taken, self._free_ids = self._free_ids[:count], self._free_ids[count:]
        for seq_id in taken:
            self._seq_remove(seq_id)
        return taken

    def _give_back_ids(self, seq_ids: Sequence[int]) -> None:
        """Return ids taken by ``_take_ids`` (context lock held)."""
        for seq_id in seq_ids:
            self._seq_remove(seq_id)
        with self._table_lock:
            self._free_ids.extend(seq_ids)

    def _drop_holder(self, slot: _Slot) -> None:
        """One handle less on ``slot`` (table lock held). The last one frees
        the id; its cells stay until the id is taken again, which bounds them
        by ``context_length`` per id as before."""
        slot.holders -= 1
        if slot.holders == 0:
            self._free_ids.append(slot.seq_id)

    def _own_slot(self, sequence: _Sequence) -> None:
        """Give ``sequence`` a slot no other handle holds, copying the cache
        if it was shared, so that decoding it changes no other handle
        (context lock held). The shared slot keeps this hold until the copy
        is made, so a release meanwhile cannot free it."""
        with self._table_lock:
            if sequence.slot.holders == 1:
                return
        [seq_id] = self._take_ids(1, "decoding a forked sequence")
        self._seq_copy(sequence.slot.seq_id, seq_id)
        self.cache_copies += 1
        with self._table_lock:
            self._drop_holder(sequence.slot)
            sequence.slot = _Slot(seq_id)

    def _gather(self, slots: Sequence[_Slot]) -> None:
        """Move ``slots`` onto consecutive sequence ids so that llama.cpp runs
        their pass as one micro-batch (context lock held), by the copies of
        ``plan_gather``; llama.cpp runs them in this order at the next pass."""
        with self._table_lock:
            by_id = {s.slot.seq_id: s.slot for s in self._sequences.values()}
            free = set(self._free_ids)
            # ids that are neither free nor held by a handle (a prompt read
            # by ``open`` whose handles are not made yet) stay where they are
            pinned = set(range(self.max_sequences)) - free - by_id.keys()
            plan = plan_gather([slot.seq_id for slot in slots], self._free_ids, self.max_sequences, pinned)
            if not plan:
                return
            for source, destination in plan:
                self._seq_copy(source, destination)
                by_id[destination] = slot = by_id.pop(source)
                slot.seq_id = destination
                free.discard(destination)
                free.add(source)
            self._free_ids = sorted(free)
            self.cache_moves += len(plan)

    def token_ids(self, handle: Handle) -> list[int]:
        return list(self._sequences.checked(handle).tokens)

    @property
    def free_slots(self) -> int:
        return len(self._free_ids)

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        parents = self._sequences.to_fork(ancestors)
        children = []
        with self._table_lock:
            for parent in parents:
                parent.slot.holders += 1
                child = _Sequence(parent.slot, list(parent.tokens), parent.n_cached, parent.next_logits)
                children.append(self._sequences.add(child))
        return children

    def release(self, handles: Sequence[Handle]) -> None:
        with self._table_lock:
            for sequence in self._sequences.release(handles):
                self._drop_holder(sequence.slot)

    # -- decoding runs (called with the context lock held) ----------------------
    def _run_feeds(self, feeds: Sequence[_Feed], sink: OutputSink) -> int:
        """Feed tokens through llama.cpp and return the number of passes.

        A pass holds at most ``prefill_chunk`` tokens of any one sequence, so
        every token goes through the same attention kernel however the
        sequences are batched (llama.cpp switches kernels at 64 query tokens
        per sequence, and the logits move). Feeds take turns, one chunk each
        per pass, until ``n_batch`` tokens or the output bound fill a pass.

        On failure, whatever this run put in the cache is removed again, so
        each sequence is left as it was."""
        ll, batch = self._ll, self._batch
        outputs: list[tuple[int, int, int]] = []  # (feed, token in feed, batch index)
        in_pass: set[int] = set()
        n = 0
        passes = 0

        def flush() -> None:
            nonlocal n, passes, outputs
            batch.n_tokens = n
            code = ll.llama_decode(self._ctx, batch)
            passes += 1
            if code != 0:
                if code == 1:
                    raise RuntimeError(
                        f"the llama.cpp cache is full ({self.n_ctx} cells for {self.max_sequences} slots): "
                        "release finished handles, or construct LlamaCppLM with a larger context_length"
                    )
                raise RuntimeError(f"llama_decode failed with code {code}")
            for feed_index, token_index, batch_index in outputs:
                pointer = ll.llama_get_logits_ith(self._ctx, batch_index)
                sink(feed_index, token_index, np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)))
            n, outputs = 0, []
            in_pass.clear()

        def chunk_size(feed: _Feed, start: int) -> int:
            size = min(self.prefill_chunk, len(feed.tokens) - start, self.n_batch - n)
            if feed.all_outputs:
                size = min(size, self._max_outputs - len(outputs))
            elif start + size == len(feed.tokens) and len(outputs) == self._max_outputs:
                size = 0
            return size

        cursors = [0] * len(feeds)
        turns = collections.deque(i for i, feed in enumerate(feeds) if feed.tokens)
        try:
            while turns:
                feed_index = turns.popleft()
                feed, start = feeds[feed_index], cursors[feed_index]
                if feed_index in in_pass:
                    flush()
                size = chunk_size(feed, start)
                if size <= 0 and n:
                    flush()
                    size = chunk_size(feed, start)
                last = len(feed.tokens) - 1
                for j in range(start, start + size):
                    wants_output = feed.all_outputs or j == last
                    batch.token[n] = feed.tokens[j]
                    batch.pos[n] = feed.pos + j
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = feed.seq_id
                    batch.logits[n] = wants_output
                    if wants_output:
                        outputs.append((feed_index, j, n))
                    n += 1
                in_pass.add(feed_index)
                cursors[feed_index] = start + size
                if cursors[feed_index] < len(feed.tokens):
                    turns.append(feed_index)
            if n:
                flush()
        except BaseException:
            for feed in feeds:
                self._seq_remove(feed.seq_id, feed.pos)
            raise
        finally:
            self.usage.forward_passes += passes
        return passes

    # -- prefill --------------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        prompts, counts = check_open(prompts, copies, self.context_length, self.vocab_size)
        self._check_open()
        if not prompts:
            return []
        self.usage.calls += 1
        slots, last_logits = await asyncio.to_thread(self._prefill, prompts)
        result: list[list[Handle]] = []
        with self._table_lock:
            for prompt, count, slot, logits in zip(prompts, counts, slots, last_logits):
                slot.holders = count
                group = []
                for _ in range(count):
                    group.append(self._sequences.add(_Sequence(slot, list(prompt), len(prompt), logits)))
                result.append(group)
        return result

    def _prefill(self, prompts: list[list[int]]) -> tuple[list[_Slot], list[np.ndarray]]:
        """Read every prompt once into a slot of its own and keep the logits
        of its last position (the first token of every copy comes from them)."""
        last_logits: list[np.ndarray] = [np.empty(0, np.float32)] * len(prompts)

        def keep(feed_index: int, _token_index: int, row: np.ndarray) -> None:
            last_logits[feed_index] = row.copy()
            last_logits[feed_index].flags.writeable = False

        with self._context_lock, Stopwatch(self.usage):
            seq_ids = self._take_ids(len(prompts), "open")
            try:
                self._run_feeds([_Feed(seq_id, 0, prompt) for seq_id, prompt in zip(seq_ids, prompts)], keep)
            except BaseException:
                self._give_back_ids(seq_ids)
                raise
            self.usage.prefill_tokens += sum(len(p) for p in prompts)
        return [_Slot(seq_id) for seq_id in seq_ids], last_logits

    # -- decoding -------------------------------------------------------------
    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        handles = list(handles)
        if not isinstance(params, StepParams):
            raise TypeError(f"params must be a StepParams, got {type(params).__name__}")
        self._sequences.to_extend(handles, seeds)
        members = []
        for i, handle in enumerate(handles):
            rng = None
            if params.temperature > 0:
                seed = int(seeds[i]) if seeds is not None else int(self._seed_source.integers(2**63))
                rng = np.random.default_rng(seed)
            member = Active(handle, params, rng)
            if len(self._sequences[handle].tokens) >= self.context_length:
                member.finish_reason = "context"  # nothing more fits; the step is empty
            members.append(member)
        if not members:
            return []
        return await self._submit(members)

    async def _decode_pass(self, members: list[Active]) -> None:
        await asyncio.to_thread(self._decode_step, members)

    def _decode_step(self, members: list[Active]) -> None:
        """One token for every member: feed pending tokens, sample, advance."""
        with self._context_lock, Stopwatch(self.usage):
            sequences = [self._sequences[m.handle] for m in members]
            needs_pass = [i for i, s in enumerate(sequences) if s.next_logits is None]
            for i in needs_pass:
                self._own_slot(sequences[i])
            if self.gather_slots and len(needs_pass) > 1:
                self._gather([sequences[i].slot for i in needs_pass])
                needs_pass.sort(key=lambda i: sequences[i].slot.seq_id)
            feeds = [
                _Feed(sequences[i].slot.seq_id, sequences[i].n_cached, sequences[i].tokens[sequences[i].n_cached :])
                for i in needs_pass
            ]
            chosen: dict[int, tuple[int, float]] = {}

            def sample(feed_index: int, _token_index: int, row: np.ndarray) -> None:
                i = needs_pass[feed_index]
                try:
                    chosen[i] = self._sample(members[i], row)
                except Exception as error:
                    # This member alone fails; its logits wait for its next
                    # step, so the sequence stays as it was before the pass.
                    sequences[i].next_logits = np.array(row, copy=True)
                    members[i].fail(error)

            if feeds:
                self._run_feeds(feeds, sample)
                for i in needs_pass:
                    sequences[i].n_cached = len(sequences[i].tokens)
            for i, sequence in enumerate(sequences):
                if sequence.next_logits is not None and i not in chosen and members[i].error is None:
                    try:
                        chosen[i] = self._sample(members[i], sequence.next_logits)
                    except Exception as error:
                        members[i].fail(error)
                        continue
                    sequence.next_logits = None
            for i, member in enumerate(members):
                if i in chosen:
                    self._advance(member, sequences[i], *chosen[i])

    @staticmethod
    def _sample(member: Active, logits: np.ndarray) -> tuple[int, float]:
        params = member.params
        return sample_token(logits, params.temperature, params.top_p, member.rng)

    def _advance(self, member: Active, sequence: _Sequence, token: int, logprob: float) -> None:
        sequence.tokens.append(token)
        member.new_tokens.append(token)
        member.logprobs.append(logprob)
        self.usage.generated_tokens += 1
        previous = len(member.text)
        member.text = self._text(member.new_tokens)
        if token in self.eos_token_ids:
            member.finish_reason = "eos"
        elif find_stop(member.text, member.params.stop, previous) is not None:
            member.finish_reason = "stop"
        elif len(member.new_tokens) >= member.params.max_tokens:
            member.finish_reason = "length"
        elif len(sequence.tokens) >= self.context_length:
            member.finish_reason = "context"

    # -- scoring --------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        """log p(continuation | prompt) per token. Continuations of the same
        prompt share one read of it."""
        pairs = check_score(prompts, continuations, self.context_length, self.vocab_size)
        self._check_open()
        self.usage.calls += 1
        results: list[ScoreOutput | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, continuation) in enumerate(pairs):
            if continuation:
                groups.setdefault(tuple(prompt), []).append(i)
            else:
                results[i] = ScoreOutput([], [])
        if groups:
            await asyncio.to_thread(self._score_groups, groups, pairs, results)
        return results  # type: ignore[return-value]

    def _score_groups(self, groups: dict[tuple[int, ...], list[int]], pairs, results: list) -> None:
        with self._context_lock, Stopwatch(self.usage):
            capacity = len(self._free_ids)
            if capacity < 2:
                raise RuntimeError(
                    f"score needs 2 free cache slots but {capacity} of {self.max_sequences} are free: "
                    "release finished handles, or construct LlamaCppLM with a larger max_sequences"
                )
            for wave in _waves(groups, capacity):
                seq_ids = self._take_ids(sum(1 + len(members) for _, members in wave), "score")
                try:
                    self._score_wave(wave, pairs, seq_ids, results)
                finally:
                    self._give_back_ids(seq_ids)

    def _score_wave(self, wave, pairs, seq_ids: list[int], results: list) -> None:
        ids = iter(seq_ids)
        prompt_ids = [next(ids) for _ in wave]
        continuation_ids = [[next(ids) for _ in members] for _, members in wave]

        # 1. Each distinct prompt once, keeping its last-position logits.
        last_logits: list[np.ndarray] = [np.empty(0)] * len(wave)

        def keep(feed_index: int, _token_index: int, row: np.ndarray) -> None:
            last_logits[feed_index] = row.copy()

        self._run_feeds([_Feed(seq_id, 0, list(prompt)) for seq_id, (prompt, _) in zip(prompt_ids, wave)], keep)
        self.usage.scored_tokens += sum(len(prompt) for prompt, _ in wave)

        # 2. Every continuation but its last token, on a copy of its prompt.
        feeds, owners = [], []
        for g, (prompt, members) in enumerate(wave):
            for seq_id, i in zip(continuation_ids[g], members):
                continuation = pairs[i][1]
                first = log_softmax_at(last_logits[g][None, :], np.array([continuation[0]]))[0]
                results[i] = ScoreOutput(list(continuation), [float(first)])
                if len(continuation) > 1:
                    self._seq_copy(prompt_ids[g], seq_id)
                    feeds.append(_Feed(seq_id, len(prompt), continuation[:-1], all_outputs=True))
                    owners.append(i)

        def collect(feed_index: int, token_index: int, row: np.ndarray) -> None:
            i = owners[feed_index]
            target = pairs[i][1][token_index + 1]
            results[i].logprobs.append(float(log_softmax_at(row[None, :], np.array([target]))[0]))

        self._run_feeds(feeds, collect)
        self.usage.scored_tokens += sum(len(f.tokens) for f in feeds)

    async def close(self) -> None:
        """Free the model and its context; the engine cannot be used after."""
        with self._context_lock:
            self._sequences.clear()
            self._finalizer()


def _waves(groups: dict[tuple[int, ...], list[int]], capacity: int):
    """Split prompt groups into waves that fit ``capacity`` slots: a wave
    needs one slot per prompt and one per continuation."""
    wave: list[tuple[tuple[int, ...], list[int]]] = []
    room = capacity
    for prompt, members in groups.items():
        members = list(members)
        while members:
            if room < 2:
                yield wave
                wave, room = [], capacity
            take, members = members[: room - 1], members[room - 1 :]
            wave.append((prompt, take))
            room -= 1 + len(take)
    if wave:
        yield wave
