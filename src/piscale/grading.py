"""Final answers: extraction and equivalence.

The answer of a response is the content of its last ``\\boxed{...}`` (Puri et
al. 2025 grade this way); without a box, ``extract_answer`` returns None.
Equivalence is symbolic or numeric, through ``math-verify``: ``1/2``,
``\\frac{1}{2}`` and ``0.5`` are the same answer. This one module serves the
verifier reward, self-consistency voting and the evaluation harness.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import parse, verify

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed),
    or None when there is no complete box."""
    matches = list(_BOX.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: its last boxed expression."""
    return extract_boxed(text)


def gsm8k_reference(solution: str) -> str:
    """The reference answer of a GSM8K solution: what follows ``####``."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution must end with '#### ANSWER'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _in_main_thread() -> bool:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=65536)
def _parse(expression: str, main: bool) -> tuple:
    # An escaped dollar (``\$18``) is a currency sign, not math mode.
    has_math_mode = re.search(r"(?<!\\)\$", expression) is not None
    wrapped = expression if has_math_mode or "\\boxed" in expression else f"${expression}$"
    parsed = parse(wrapped, parsing_timeout=5 if main else None)
    if not parsed:
        parsed = parse(expression, parsing_timeout=5 if main else None)
    return tuple(parsed)


def normalize_answer(answer: str) -> str:
    """A canonical string for voting: the parsed expression when math-verify
    understands it, else the stripped text without spaces."""
    parsed = _parse(answer, _in_main_thread())
    return str(parsed[0]) if parsed else re.sub(r"\s+", "", answer)


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Whether two final answers are equivalent (symbolically or numerically)."""
    if predicted is None or reference is None:
        return False
    if predicted.strip() == reference.strip():
        return True
    return _equivalent(predicted, reference, _in_main_thread())


@lru_cache(maxsize=65536)
def _equivalent(predicted: str, reference: str, main: bool) -> bool:
    # Cached like _parse: grouping the answers of a population compares the
    # same pairs again for each selection rule, bound and table of a report.
    gold, target = _parse(reference, main), _parse(predicted, main)
    if not gold or not target:
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=5 if main else None))


def is_correct(response: str, reference: str) -> bool:
    """Grade a whole response against a reference answer."""
    return answers_equal(extract_answer(response), reference)
