"""Training-free rewards that check an answer: a final-answer verifier and an
arithmetic step checker.

**Verifier.** The final answer of a partial answer is its last ``\\boxed{}``
(``piscale.grading.extract_answer``); it scores 1 when that answer is
equivalent to the reference (``piscale.grading.answers_equal``: symbolic or
numeric equivalence through math-verify) and 0 when it is not; it compares in
the installed ``piscale.grading.GradingPool`` when there is one. A partial answer
with no box has not answered yet and scores ``unanswered`` (0.5 by default: odds
1:1, a logit of 0, i.e. no evidence either way). It is an outcome reward: a
search should apply it to finished answers, where a missing box is simply wrong.

**Arithmetic checker.** A step such as "She sells 16 - 3 - 4 = 9 eggs at $2, so
9 * 2 = 18 dollars" makes arithmetic claims. The checker finds every equation
``a = b`` (also chains ``a = b = c``, LaTeX ``5 \\times 3``, ``\\frac{a}{b}`` and
GSM8K calculator notes ``<<16-3-4=9>>``), evaluates both sides exactly with
rational arithmetic (a small recursive-descent parser; nothing is ``eval``-ed),
and scores the step by the fraction of equations that hold. A right-hand side
written as a rounded decimal holds if the left side rounds to it at the same
number of decimals (``10/3 = 3.33``). A step with no equation scores
``no_equation`` (0.5 by default; with ``prod`` aggregation 1.0 is the neutral
choice, so that steps without arithmetic do not lower the product).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from piscale.grading import answers_equal_async, extract_answer
from piscale.rewards.aggregate import join_steps
from piscale.rewards.prefix import PrefixKey, PrefixReward


class VerifierReward(PrefixReward):
    """1.0 if the last boxed answer is equivalent to the reference, else 0.0;
    ``unanswered`` when there is no box yet.

    ``reference`` is one answer for every prompt, or a mapping from prompt to
    its answer (for a batch of different problems).
    """

    scale = "probability"
    outcome_only = True

    def __init__(self, reference: str | Mapping[str, str], unanswered: float = 0.5, memo_size: int = 4096):
        super().__init__(memo_size)
        if isinstance(reference, str):
            if not reference.strip():
                raise ValueError("the reference answer is empty")
        elif not isinstance(reference, Mapping):
            raise TypeError(f"reference must be a string or a prompt->answer mapping, got {type(reference)}")
        if not 0.0 <= unanswered <= 1.0:
            raise ValueError(f"unanswered must be a probability in [0, 1], got {unanswered}")
        self.reference = reference
        self.unanswered = float(unanswered)
        self.name = "verify"
        self._slow: set[str] = set()
        """answers whose grading ran out of time in a grading pool: not graded again."""

    def reference_for(self, prompt: str) -> str:
        if isinstance(self.reference, str):
            return self.reference
        try:
            return self.reference[prompt]
        except KeyError:
            raise KeyError(f"no reference answer for the prompt {prompt[:80]!r}") from None

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        scores = []
        for prompt, steps in items:
            answer = extract_answer(join_steps(steps))
            if answer is None:
                scores.append(self.unanswered)
            else:
                equal = await answers_equal_async(answer, self.reference_for(prompt), self._slow)
                scores.append(1.0 if equal else 0.0)
        return scores


# -- arithmetic ---------------------------------------------------------------


class ArithmeticSyntaxError(ValueError):
    """The tokens are not one complete arithmetic expression."""


@dataclass(frozen=True)
class Equation:
    """One claimed equality ``left = right`` found in a text."""

    left: str
    right: str
    holds: bool
    """Whether both sides evaluate to the same number (or the right side is the
    left side rounded to the decimals it shows)."""


_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)(%?)|([-+*/^()=]))")
_MAX_EXPONENT = 64
_MAX_DIGITS = 4000


def _normalise(text: str) -> str:
    """Rewrite LaTeX and typographic arithmetic into plain ASCII operators;
    anything that is not arithmetic is left to break expressions apart."""
    text = text.replace("<<", " ; ").replace(">>", " ; ")
    text = re.sub(r"\\text\s*\{[^{}]*\}", " ; ", text)
    text = re.sub(r"\\(?:boxed|fbox|mathbf|mathrm)\s*", "", text)
    # \frac{a}{b} and \dfrac{a}{b} with simple (brace-free) numerator and denominator.
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", text)
    for pattern, replacement in (
        (r"\\times|\\cdot|\\ast|×|·|∗", "*"),
        (r"\\div|÷", "/"),
        (r"−|–", "-"),
        (r"\\left|\\right|\\[,;!: ]|\\quad|\\qquad", " "),
        (r"\\[()\[\]]|\$", " "),
        (r"\\%", "%"),
    ):
        text = re.sub(pattern, replacement, text)
    text = text.replace("{", "(").replace("}", ")")
    # Thousands separators: 1,234,567 -> 1234567.
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    # "5 x 3" is a product when x stands between two numbers.
    text = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])", " * ", text)
    return text


def _segments(text: str) -> list[list[tuple[str, str]]]:
    """Maximal runs of arithmetic tokens: (kind, text) with kind in
    {"num", "op", "="}; any other character ends a run."""
    runs: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if current:
                runs.append(current)
                current = []
            position += 1
            while position < len(text) and text[position].isspace():
                position += 1
            continue
        number, percent, operator = match.groups()
        if number is not None:
            current.append(("num", number + percent))
        elif operator == "=":
            current.append(("=", "="))
        else:
            current.append(("op", operator))
        position = match.end()
    if current:
        runs.append(current)
    return runs


class _Parser:
    """expression := term (('+'|'-') term)*
    term := unary (('*'|'/') unary | implicit-product '(' ... ')')*
    unary := ('-'|'+') unary | power
    power := atom ('^' unary)?
    atom := number['%'] | '(' expression ')'"""

    def __init__(self, tokens: Sequence[tuple[str, str]]):
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise ArithmeticSyntaxError("unexpected end of expression")
        token = self.tokens[self.i]
        self.i += 1
        return token

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ArithmeticSyntaxError("empty expression")
        value = self.expression()
        if self.i != len(self.tokens):
            raise ArithmeticSyntaxError(f"unexpected {self.tokens[self.i][1]!r}")
        return value

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            operator = self.take()[1]
            right = self.term()
            value = value + right if operator == "+" else value - right
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while True:
            if self.peek() in ("*", "/"):
                operator = self.take()[1]
                right = self.unary()
                if operator == "*":
                    value = value * right
                elif right == 0:
                    raise ZeroDivisionError("division by zero")
                else:
                    value = value / right
            elif self.peek() == "(":
                value = value * self.unary()
            else:
                return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = self.take()[1]
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "^":
            self.take()
            exponent = self.unary()
            if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT:
                raise ArithmeticSyntaxError("only small integer exponents are evaluated")
            if base == 0 and exponent < 0:
                raise ZeroDivisionError("zero to a negative power")
            return base ** int(exponent)
        return base

    def atom(self) -> Fraction:
        kind, text = self.take()
        if kind == "num":
            if len(text) > _MAX_DIGITS:
                raise ArithmeticSyntaxError("number too long")
            if text.endswith("%"):
                return Fraction(text[:-1]) / 100
            return Fraction(text)
        if text == "(":
            value = self.expression()
            if self.take()[1] != ")":
                raise ArithmeticSyntaxError("missing ')'")
            return value
        raise ArithmeticSyntaxError(f"unexpected {text!r}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (``+ - * / ^``, parentheses,
    ``%``, LaTeX ``\\times``/``\\div``/``\\frac``). Raises ``ValueError`` (or
    ``ZeroDivisionError``) for anything else."""
    runs = _segments(_normalise(expression))
    if len(runs) != 1 or any(kind == "=" for kind, _ in runs[0]):
        raise ArithmeticSyntaxError(f"not a single arithmetic expression: {expression!r}")
    return _Parser(runs[0]).parse()


def _value(tokens: Sequence[tuple[str, str]]) -> Fraction | None:
    try:
        return _Parser(tokens).parse()
    except ArithmeticSyntaxError:
        return None


def _decimals(tokens: Sequence[tuple[str, str]]) -> int | None:
    """Decimal places of a side that is one plain number, else None."""
    if len(tokens) == 1 and tokens[0][0] == "num" and not tokens[0][1].endswith("%"):
        text = tokens[0][1]
        return len(text.split(".", 1)[1]) if "." in text else 0
    return None


def _equal(left: Fraction, right: Fraction, right_decimals: int | None) -> bool:
    if left == right:
        return True
    if right_decimals is None or right_decimals == 0:
        return False
    # A rounded decimal: |left - right| <= half a unit in its last place.
    return abs(left - right) <= Fraction(1, 2 * 10**right_decimals)


def _text(tokens: Sequence[tuple[str, str]]) -> str:
    return " ".join(text for _, text in tokens)


def _has_operator(tokens: Sequence[tuple[str, str]]) -> bool:
    """Whether a side computes something; a leading sign alone ("-3") does not."""
    return any(
        kind == "op" and text in "+-*/^" and not (i == 0 and text in "+-")
        for i, (kind, text) in enumerate(tokens)
    )


def find_equations(text: str) -> list[Equation]:
    """Every arithmetic equation claimed in ``text``, evaluated.

    A run of arithmetic tokens with k ``=`` signs is a chain of k equations
    between neighbouring sides. The outermost sides may carry stray tokens
    from the surrounding prose (``"(3 + 4 = 7)"``), so the first side is
    trimmed from its left and the last side from its right until they parse;
    an inner side must parse as it is. A chain counts only if some side
    computes something (has an operator): ``2 = 2`` claims no arithmetic. A
    side that divides by zero makes its equations false.
    """
    equations: list[Equation] = []
    for run in _segments(_normalise(text)):
        if not any(kind == "=" for kind, _ in run):
            continue
        sides: list[list[tuple[str, str]]] = [[]]
        for token in run:
            if token[0] == "=":
                sides.append([])
            else:
                sides[-1].append(token)
        values: list[Fraction | None | _Undefined] = []
        for index, side in enumerate(sides):
            parsed = _value_of_side(side, index, len(sides))
            if parsed is None:
                values.append(None)
            else:
                values.append(parsed[0])
                sides[index] = parsed[1]
        if not any(_has_operator(side) for side, value in zip(sides, values) if value is not None):
            continue
        for index in range(len(sides) - 1):
            left, right = sides[index], sides[index + 1]
            left_value, right_value = values[index], values[index + 1]
            if left_value is None or right_value is None:
                continue
            if isinstance(left_value, _Undefined) or isinstance(right_value, _Undefined):
                holds = False
            else:
                holds = _equal(left_value, right_value, _decimals(right)) or _equal(
                    right_value, left_value, _decimals(left)
                )
            equations.append(Equation(_text(left), _text(right), holds))
    return equations


class _Undefined:
    """The value of a side that divides by zero."""


def _value_of_side(
    side: list[tuple[str, str]], index: int, count: int
) -> tuple[Fraction | _Undefined, list[tuple[str, str]]] | None:
    """The value of one side and the tokens that make it, trimming stray
    tokens at the outer end of the first and last sides; None if no part of
    it parses."""
    candidates: list[list[tuple[str, str]]] = [side]
    if index == 0:
        candidates += [side[start:] for start in range(1, len(side))]
    elif index == count - 1:
        candidates += [side[:end] for end in range(len(side) - 1, 0, -1)]
    for tokens in candidates:
        try:
            value = _value(tokens)
        except ZeroDivisionError:
            return _Undefined(), tokens
        if value is not None:
            return value, tokens
    return None


class ArithmeticReward(PrefixReward):
    """A training-free process reward for arithmetic word problems: the score
    of a step is the fraction of its equations that hold (see the module doc)."""

    scale = "probability"
    outcome_only = False

    def __init__(self, no_equation: float = 0.5, memo_size: int = 4096):
        super().__init__(memo_size)
        if not 0.0 <= no_equation <= 1.0:
            raise ValueError(f"no_equation must be a probability in [0, 1], got {no_equation}")
        self.no_equation = float(no_equation)
        self.name = "arith"

    def score_text(self, text: str) -> float:
        equations = find_equations(text)
        if not equations:
            return self.no_equation
        return sum(e.holds for e in equations) / len(equations)

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        # The step judged is the last one of the prefix.
        return [self.score_text(steps[-1]) for _, steps in items]
