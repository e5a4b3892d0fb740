r"""A language model whose probabilities are known exactly.

``ToyLM`` implements the whole backend protocol (``piscale.lm.base``) over a
*rule*: a plain function that, given the prompt text and the tokens generated
so far, returns the next-token distribution as ``{token text: probability}``.
The rule is unrolled once per prompt into the finite tree of every possible
answer (each path ends with the end-of-sequence token), so

    p(x | c) = prod_t rule(c, x_{<t})[x_t]

is exact for every complete answer x, and ``enumerate_answers`` lists them
all. That is what makes posterior tests possible: a search's output can be
compared with p(x | c) · r(x), normalised by brute force.

Tokens are words: the vocabulary holds special tokens (end of sequence, chat
markers), the step delimiter "\n\n", the words the rule uses, every printable
ASCII character, and byte tokens for anything else, so any text can be
encoded (longest match first) and decoded back.

Sampling is vectorised over sequences: the tree is stored as arrays (children
of each node, their probabilities), and one decoding pass draws one token for
every active sequence. The uniform for the k-th token of a step is a hash of
(seed, k), so equal seeds and equal sequences give equal steps whatever else
is in the batch. Concurrent ``extend`` calls (from ``asyncio.gather``) are
merged into the same passes (``piscale.lm.batching.MergedCalls``). The
passes, and the unrolling of a new prompt's tree, run on a worker thread, so
that a large tree leaves the caller's event loop free (a server answers its
probes meanwhile).

The default rule, ``counting_rule``, writes short counting solutions such as
"Add 2\n\nAdd 1\n\n\boxed{4}".
"""

from __future__ import annotations

import asyncio
import math
import re
import string
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from piscale.lm.base import FinishReason, Handle, ScoreOutput, StepOutput, StepParams, Stopwatch, Usage, find_stop
from piscale.lm.batching import MergedCalls
from piscale.lm.table import SequenceTable, TableLM, check_open, check_score

ToyRule = Callable[[str, tuple[str, ...]], Mapping[str, float]]
"""(prompt text, generated tokens) -> {next token: probability}."""

EOS = "<|endoftext|>"
STEP = "\n\n"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (EOS, *CHAT_MARKERS)

_MASK64 = (1 << 64) - 1


# -- the default rule -------------------------------------------------------

COUNTING_WORDS = ("Add", " 1", " 2", "\\boxed{", "}")
_ANSWER_AFTER = (0.2, 0.4, 0.6)  # P(answer now | steps written so far); forced after 3


def counting_start(prompt: str) -> int:
    """The value ``counting_rule`` starts from for a prompt (its CRC mod 3)."""
    return zlib.crc32(prompt.encode()) % 3


def counting_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    """A counting "solution": start at a value v0 in {0, 1, 2} fixed by the
    prompt (a CRC of its text), write steps "Add 1" / "Add 2" (probabilities
    0.6 / 0.4), each ended by "\\n\\n"; after t steps answer with probability
    0.2, 0.4, 0.6 (always after 3). The answer "\\boxed{d}" is the running
    total v with probability 0.6, v + 1 with 0.25 and v - 1 with 0.15 (0.15
    moves to v when v = 0), then end of sequence."""
    value = counting_start(prompt) + sum(int(token) for token in generated if token in (" 1", " 2"))
    last = generated[-1] if generated else STEP
    if last == STEP:
        steps = generated.count(STEP)
        answer = _ANSWER_AFTER[steps] if steps < len(_ANSWER_AFTER) else 1.0
        return {"\\boxed{": answer, "Add": 1.0 - answer} if answer < 1.0 else {"\\boxed{": 1.0}
    if last == "Add":
        return {" 1": 0.6, " 2": 0.4}
    if last in (" 1", " 2"):
        return {STEP: 1.0}
    if last == "\\boxed{":
        low = 0.15 if value > 0 else 0.0
        answers = {str(value): 0.75 - low, str(value + 1): 0.25}
        if low:
            answers[str(value - 1)] = low
        return answers
    if last == "}":
        return {EOS: 1.0}
    return {"}": 1.0}  # after the answer digit


# -- results ----------------------------------------------------------------


@dataclass(frozen=True)
class ToyAnswer:
    """One complete answer of the toy model and its exact probability."""

    token_ids: tuple[int, ...]
    """generated tokens, the end-of-sequence token last."""
    text: str
    """the decoded answer (special tokens are not part of the text)."""
    log_probability: float

    @property
    def probability(self) -> float:
        return math.exp(self.log_probability)


@dataclass
class _Sequence:
    prompt: tuple[int, ...]
    """the context before the answer; the answer so far is the path to ``node``."""
    node: int
    busy: bool = False


@dataclass
class _Request:
    handles: list[Handle]
    params: StepParams
    seeds: np.ndarray


class ToyLM(TableLM):
    """A ``LanguageModel`` over an exactly known next-token rule.

    ``rule`` defaults to ``counting_rule``; ``words`` are extra vocabulary
    entries the rule may emit (every printable ASCII character and "\\n\\n"
    are always there). ``max_answer_tokens`` bounds the length of an answer:
    a rule that has not ended by then is an error. ``seed`` seeds the steps of
    ``extend`` calls made without seeds.
    """

    def __init__(
        self,
        rule: ToyRule | None = None,
        *,
        words: Sequence[str] = (),
        context_length: int = 4096,
        max_answer_tokens: int = 64,
        max_nodes: int = 200_000,
        seed: int = 0,
        name: str = "toy",
    ):
        if rule is None:
            rule, words = counting_rule, (*COUNTING_WORDS, *words)
        self.rule = rule
        self.name = name
        self.context_length = context_length
        self.max_answer_tokens = max_answer_tokens
        self.max_nodes = max_nodes
        self.usage = Usage()

        characters = [c for c in string.printable if c not in "\x0b\x0c"]
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        ordered = dict.fromkeys([*SPECIAL_TOKENS, STEP, *words, *characters, *byte_tokens])
        if any(not token for token in ordered):
            raise ValueError("vocabulary words must be non-empty strings")
        self.vocabulary: tuple[str, ...] = tuple(ordered)
        self.token_id = {token: i for i, token in enumerate(self.vocabulary)}
        self.vocab_size = len(self.vocabulary)
        self.eos_token_id = self.token_id[EOS]
        self.eos_token_ids = frozenset({self.eos_token_id})
        self._byte_value = {self.token_id[t]: b for b, t in enumerate(byte_tokens)}
        self._special_ids = frozenset(self.token_id[t] for t in SPECIAL_TOKENS)
        self._visible_text = [
            "" if i in self._special_ids or i in self._byte_value else t for i, t in enumerate(self.vocabulary)
        ]
        textual = [t for t in self.vocabulary if t not in byte_tokens]
        alternatives = "|".join(re.escape(t) for t in sorted(textual, key=len, reverse=True))
        self._tokenizer = re.compile(f"({alternatives})|(.)", re.DOTALL)

        # All compiled trees share these arrays; node 0 of a tree is its root.
        self._roots: dict[tuple[int, ...], int] = {}
        self._parent = np.zeros(0, dtype=np.int64)
        self._token = np.zeros(0, dtype=np.int64)
        self._depth = np.zeros(0, dtype=np.int64)
        self._child_token = np.zeros((0, 1), dtype=np.int64)
        self._child_node = np.zeros((0, 1), dtype=np.int64)
        self._child_prob = np.zeros((0, 1), dtype=float)

        self._sequences: SequenceTable[_Sequence] = SequenceTable()
        self._steps: MergedCalls[_Request, list[StepOutput]] = MergedCalls(self._decode_counted, self._step_over)
        # Scoring calls that arrive together are one pass too, so concurrent
        # searches stay in step and their next decoding calls merge as well.
        self._scores: MergedCalls[list, list[ScoreOutput]] = MergedCalls(self._score_counted)
        self._rng = np.random.default_rng(seed)
        # Held by whoever reads or grows the tree arrays on a worker thread
        # (unrolling a prompt replaces them several at a time).
        self._tree_lock = threading.Lock()

    # -- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = []
        for match in self._tokenizer.finditer(text):
            if match.group(1) is not None:
                ids.append(self.token_id[match.group(1)])
            else:
                ids.extend(self.token_id[f"<0x{b:02X}>"] for b in match.group(2).encode())
        return ids

    def prompt_text(self, prompt_ids: Sequence[int]) -> str:
        """The prompt as the rule sees it: its text with the chat markers."""
        return self._render(prompt_ids, keep_special=True)

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``; special tokens are left out, as a chat
        model's decoder would."""
        return self._render(token_ids, keep_special=False)

    def _render(self, token_ids: Sequence[int], keep_special: bool) -> str:
        parts: list[str] = []
        pending = bytearray()
        for token in token_ids:
            token = int(token)
            if not 0 <= token < len(self.vocabulary):
                raise ValueError(f"token id {token} is outside the toy vocabulary of {len(self.vocabulary)}")
            if token in self._byte_value:
                pending.append(self._byte_value[token])
                continue
            if pending:
                parts.append(pending.decode(errors="replace"))
                pending.clear()
            parts.append(self.vocabulary[token] if keep_special else self._visible_text[token])
        if pending:
            parts.append(pending.decode(errors="replace"))
        return "".join(parts)

    def chat(self, messages, *, add_generation_prompt=True, continue_final_message=False) -> list[int]:
        """``<|role|>\\ncontent<|end|>\\n`` per message, then ``<|assistant|>\\n``."""
        messages = list(messages)
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i} needs a role system/user/assistant and a string content, got {message}")
            last = i == len(messages) - 1
            ending = "" if last and continue_final_message else "<|end|>\n"
            parts.append(f"<|{role}|>\n{content}{ending}")
        if add_generation_prompt and not continue_final_message:
            parts.append("<|assistant|>\n")
        return self.encode("".join(parts))

    # -- the tree of answers ------------------------------------------------
    def _split(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(context, answer prefix): the answer starts after the last
        ``<|assistant|>\n``, so that a sequence re-opened with part of an
        answer in its prompt continues exactly as the original would."""
        prompt = tuple(int(t) for t in prompt)
        marker = self.token_id["<|assistant|>"]
        start = max((i + 1 for i, t in enumerate(prompt) if t == marker), default=len(prompt))
        if start < len(prompt) and prompt[start] == self.token_id["\n"]:
            start += 1
        return prompt[:start], prompt[start:]

    def _locate(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """The context of ``prompt`` and the tree node its answer prefix reaches."""
        with self._tree_lock:
            return self._locate_held(prompt)

    def _locate_held(self, prompt: Sequence[int]) -> tuple[tuple[int, ...], int]:
        context, prefix = self._split(prompt)
        node = self._root(context)
        for position, token in enumerate(prefix):
            column = np.flatnonzero(self._child_token[node] == token)
            if not len(column):
                raise ValueError(
                    f"the toy model cannot produce the answer prefix {self.decode(prefix[: position + 1])!r} "
                    "of this prompt, so it has no continuation"
                )
            node = int(self._child_node[node, column[0]])
        return context, node

    def _root(self, prompt: tuple[int, ...]) -> int:
        """The root node of ``prompt``'s answer tree, compiling it on first use."""
        root = self._roots.get(prompt)
        if root is None:
            root = self._compile(prompt)
            self._roots[prompt] = root
        return root

    def _compile(self, prompt: tuple[int, ...]) -> int:
        prompt_text = self.prompt_text(prompt)
        first = len(self._parent)
        parents, tokens, depths = [-1], [-1], [0]
        children: list[list[tuple[int, float, int]]] = [[]]
        frontier: list[tuple[int, tuple[str, ...]]] = [(0, ())]
        while frontier:
            local, generated = frontier.pop()
            if generated and generated[-1] == EOS:
                continue
            if len(generated) >= self.max_answer_tokens:
                raise ValueError(
                    f"the toy rule wrote {len(generated)} tokens without ending; it must emit {EOS!r} "
                    f"within max_answer_tokens={self.max_answer_tokens}"
                )
            distribution = self._checked(self.rule(prompt_text, generated), generated)
            for token, probability in distribution:
                child = len(parents)
                if child > self.max_nodes:
                    raise ValueError(f"the toy rule's answer tree has more than max_nodes={self.max_nodes} nodes")
                parents.append(local)
                tokens.append(self.token_id[token])
                depths.append(len(generated) + 1)
                children.append([])
                children[local].append((self.token_id[token], probability, first + child))
                frontier.append((child, (*generated, token)))
        self._append_tree(first, parents, tokens, depths, children)
        return first

    def _checked(self, distribution: Mapping[str, float], generated: tuple[str, ...]) -> list[tuple[str, float]]:
        where = f"after {''.join(generated)!r}"
        items = [(t, float(p)) for t, p in distribution.items() if p != 0]
        for token, probability in items:
            if token not in self.token_id:
                raise ValueError(f"the toy rule returned {token!r} {where}, which is not in the vocabulary; add it to words=")
            if not 0 < probability <= 1:
                raise ValueError(f"the toy rule gave {token!r} probability {probability} {where}")
        total = math.fsum(p for _, p in items)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"the toy rule's probabilities {where} sum to {total}, not 1")
        return items

    def _append_tree(self, first, parents, tokens, depths, children) -> None:
        width = max(self._child_token.shape[1], max(len(c) for c in children))
        count = len(parents)
        child_token = np.full((count, width), -1, dtype=np.int64)
        child_node = np.full((count, width), -1, dtype=np.int64)
        child_prob = np.zeros((count, width))
        for i, row in enumerate(children):
            for j, (token, probability, node) in enumerate(row):
                child_token[i, j], child_prob[i, j], child_node[i, j] = token, probability, node

        def widen(table: np.ndarray, fill) -> np.ndarray:
            extra = width - table.shape[1]
            return table if extra == 0 else np.pad(table, ((0, 0), (0, extra)), constant_values=fill)

        self._child_token = np.concatenate([widen(self._child_token, -1), child_token])
        self._child_node = np.concatenate([widen(self._child_node, -1), child_node])
        self._child_prob = np.concatenate([widen(self._child_prob, 0.0), child_prob])
        self._parent = np.concatenate([self._parent, [p + first if p >= 0 else -1 for p in parents]])
        self._token = np.concatenate([self._token, tokens])
        self._depth = np.concatenate([self._depth, depths])

    def _path(self, node: int) -> list[int]:
        """Generated token ids from the root to ``node``."""
        path = []
        while self._parent[node] >= 0:
            path.append(int(self._token[node]))
            node = int(self._parent[node])
        return path[::-1]

    def enumerate_answers(self, prompt_ids: Sequence[int]) -> list[ToyAnswer]:
        """Every complete answer to the prompt with its exact probability
        (the probabilities sum to one)."""
        with self._tree_lock:
            context, root = self._locate_held(prompt_ids)
            if root != self._roots[context]:
                raise ValueError("enumerate_answers takes a prompt without an answer prefix")
            answers = []
            stack: list[tuple[int, float]] = [(root, 0.0)]
            while stack:
                node, log_probability = stack.pop()
                if self._token[node] == self.eos_token_id:
                    path = self._path(node)
                    answers.append(ToyAnswer(tuple(path), self.decode(path), log_probability))
                    continue
                for j in range(self._child_token.shape[1]):
                    if self._child_node[node, j] >= 0:
                        stack.append((int(self._child_node[node, j]), log_probability + math.log(self._child_prob[node, j])))
            return answers

    # -- sequences ----------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        checked, counts = check_open(prompts, copies, self.context_length)
        prompts = [tuple(p) for p in checked]
        with Stopwatch(self.usage):
            located = await asyncio.to_thread(lambda: [self._locate(p) for p in prompts])
            self.usage.calls += 1
            self.usage.forward_passes += 1
            self.usage.prefill_tokens += sum(len(p) for p in prompts)
            return [
                [self._sequences.add(_Sequence(context, node)) for _ in range(c)]
                for (context, node), c in zip(located, counts)
            ]

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        return [self._sequences.add(_Sequence(p.prompt, p.node)) for p in self._sequences.to_fork(ancestors)]

    def token_ids(self, handle: Handle) -> list[int]:
        sequence = self._sequences.checked(handle)
        return [*sequence.prompt, *self._path(sequence.node)]

    # -- decoding -----------------------------------------------------------
    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        handles = list(handles)
        sequences = self._sequences.to_extend(handles, seeds)
        for handle, sequence in zip(handles, sequences):
            if self._token[sequence.node] == self.eos_token_id:
                raise ValueError(f"sequence {handle} has ended with end-of-sequence; it cannot be extended")
        if not handles:
            return []
        if seeds is None:
            seed_array = self._rng.integers(0, 2**63, size=len(handles), dtype=np.int64).astype(np.uint64)
        else:
            seed_array = np.array([int(s) & _MASK64 for s in seeds], dtype=np.uint64)
        for sequence in sequences:
            sequence.busy = True
        self.usage.calls += 1
        return await self._steps.submit(_Request(handles, params, seed_array))

    def _decode_counted(self, requests: list[_Request]) -> list[list[StepOutput]]:
        """``_decode``, its counts undone when it fails (its requests are
        then decoded again one by one; see ``MergedCalls``)."""
        counted = (self.usage.generated_tokens, self.usage.forward_passes)
        try:
            with Stopwatch(self.usage):
                return self._decode(requests)
        except Exception:
            self.usage.generated_tokens, self.usage.forward_passes = counted
            raise

    def _step_over(self, request: _Request) -> None:
        for handle in request.handles:
            self._sequences[handle].busy = False

    def _decode(self, requests: list[_Request]) -> list[list[StepOutput]]:
        with self._tree_lock:
            return self._decode_held(requests)

    def _decode_held(self, requests: list[_Request]) -> list[list[StepOutput]]:
        rows = [(request, handle) for request in requests for handle in request.handles]
        count = len(rows)
        node = np.array([self._sequences[h].node for _, h in rows], dtype=np.int64)
        prompt_length = np.array([len(self._sequences[h].prompt) for _, h in rows])
        seeds = np.concatenate([r.seeds for r in requests])
        temperature = np.array([r.params.temperature for r, _ in rows])
        top_p = np.array([r.params.top_p for r, _ in rows])
        max_tokens = [r.params.max_tokens for r, _ in rows]
        stops = [r.params.stop for r, _ in rows]
        new_tokens: list[list[int]] = [[] for _ in range(count)]
        logprobs: list[list[float]] = [[] for _ in range(count)]
        texts = [""] * count
        finish: list[FinishReason | None] = [None] * count
        active = np.arange(count)
        position = 0
        while len(active):
            at = node[active]
            probabilities = self._child_prob[at]
            chosen = _sample(probabilities, temperature[active], top_p[active], _uniforms(seeds[active], position))
            picked = np.arange(len(active))
            tokens = self._child_token[at, chosen]
            chosen_logprobs = np.log(probabilities[picked, chosen])
            node[active] = self._child_node[at, chosen]
            self.usage.forward_passes += 1
            self.usage.generated_tokens += len(active)
            still = []
            for row, token, logprob in zip(active.tolist(), tokens.tolist(), chosen_logprobs.tolist()):
                new_tokens[row].append(token)
                logprobs[row].append(logprob)
                previous = len(texts[row])
                texts[row] += self._visible_text[token]
                if token == self.eos_token_id:
                    finish[row] = "eos"
                elif find_stop(texts[row], stops[row], previous) is not None:
                    finish[row] = "stop"
                elif len(new_tokens[row]) >= max_tokens[row]:
                    finish[row] = "length"
                elif prompt_length[row] + self._depth[node[row]] >= self.context_length:
                    finish[row] = "context"
                else:
                    still.append(row)
            active = np.array(still, dtype=np.int64)
            position += 1
        for row, (_, handle) in enumerate(rows):
            self._sequences[handle].node = int(node[row])
        outputs, row = [], 0
        for request in requests:
            outputs.append(
                [
                    StepOutput(new_tokens[r], texts[r], logprobs[r], finish[r])  # type: ignore[arg-type]
                    for r in range(row, row + len(request.handles))
                ]
            )
            row += len(request.handles)
        return outputs

    # -- scoring ------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        """Exact log p(continuation | prompt) per token; a token the rule
        cannot produce there gets -inf, and so does every token after it."""
        pairs = [(tuple(p), c) for p, c in check_score(prompts, continuations, self.context_length)]
        with Stopwatch(self.usage):
            self.usage.calls += 1
            self.usage.scored_tokens += sum(len(prompt) + len(continuation) for prompt, continuation in pairs)
            return await self._scores.submit(pairs)

    def _score_counted(self, requests: list[list]) -> list[list[ScoreOutput]]:
        """One merged scoring pass (on the worker thread): every request's pairs."""
        with self._tree_lock:  # a decoding pass on the other worker counts under it too
            self.usage.forward_passes += 1
        return [self._score_pairs(pairs) for pairs in requests]

    def _score_pairs(self, pairs: list[tuple[tuple[int, ...], list[int]]]) -> list[ScoreOutput]:
        with self._tree_lock:
            outputs = []
            for prompt, continuation in pairs:
                node: int | None = self._locate_held(prompt)[1]
                values = []
                for token in continuation:
                    column = np.flatnonzero(self._child_token[node] == token) if node is not None else []
                    if len(column):
                        values.append(math.log(self._child_prob[node, column[0]]))
                        node = int(self._child_node[node, column[0]])
                    else:
                        values.append(-math.inf)
                        node = None
                outputs.append(ScoreOutput(continuation, values))
            return outputs

    async def close(self) -> None:
        self._sequences.clear()


def _uniforms(seeds: np.ndarray, position: int) -> np.ndarray:
    """A uniform in [0, 1) per seed for the ``position``-th token of a step:
    the splitmix64 hash of (seed, position), so each sequence's randomness
    depends only on its own seed."""
    with np.errstate(over="ignore"):
        z = seeds + np.uint64((position + 1) * 0x9E3779B97F4A7C15 & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sample(probabilities: np.ndarray, temperature: np.ndarray, top_p: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Column of the token drawn in each row: greedy where the temperature is
    0, else by inverse CDF from p^(1/T) (renormalised) restricted to the
    top-p nucleus."""
    greedy = probabilities.argmax(axis=1)
    sampled = temperature > 0
    if not sampled.any():
        return greedy
    with np.errstate(divide="ignore"):
        logits = np.log(probabilities[sampled]) / temperature[sampled][:, None]
    # Subtracting the row maximum keeps p^(1/T) representable at tiny T.
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    nucleus = top_p[sampled] < 1.0
    if nucleus.any():
        q = p[nucleus]
        order = np.argsort(-q, axis=1, kind="stable")
        ordered = np.take_along_axis(q, order, axis=1)
        mass_before = np.cumsum(ordered, axis=1) - ordered
        ordered[mass_before >= top_p[sampled][nucleus][:, None]] = 0.0
        filtered = np.zeros_like(q)
        np.put_along_axis(filtered, order, ordered, axis=1)
        p[nucleus] = filtered / filtered.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    drawn = (cdf <= uniforms[sampled][:, None]).sum(axis=1)
    chosen = greedy.copy()
    chosen[sampled] = np.minimum(drawn, p.shape[1] - 1)
    return chosen
