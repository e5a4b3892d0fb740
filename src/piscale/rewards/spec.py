"""Rewards from short text specs, for the command line and configs.

| spec | reward |
|---|---|
| ``judge:MODEL`` | ``LLMJudge`` over the backend of MODEL (the policy's own backend when MODEL is the policy's spec) |
| ``prm:MODEL`` | a transformers PRM (``load_prm``): classification head or Math-Shepherd-style tag PRM |
| ``cdr:STRONG,WEAK`` | ``DensityRatioReward`` of STRONG over WEAK, criteria routed by domain |
| ``verify:ANSWER`` | ``VerifierReward`` against ANSWER |
| ``arith`` | ``ArithmeticReward`` |
| ``embed:POSITIVE|NEGATIVE`` | ``EmbeddingReward``; several descriptions on a side are separated by ``;`` |
| ``certainty``, ``certainty:group[:WINDOW]`` | ``SelfCertaintyReward``: the policy's mean token log-probability, or its lowest ``WINDOW``-token group mean; search only |
| ``value:PATH``, ``value`` | ``StepValueReward`` from a head file (``piscale prm train``), its backbone named in the file; ``value`` alone: the head shipped for the catalog's default math policy |
| ``final:SPEC`` | ``Terminal``: in a product, a terminal potential that judges finished answers only; a particle filter weighs it in after the last resampling (``value*arith*final:certainty^10`` steers by the value and the checker and weighs certainty in on the answers) |
| ``SPEC*SPEC[*...]`` | the product of the terms' likelihoods (``WeightedSum`` in log space, every weight 1), e.g. ``value*arith`` |
| ``SPEC^W`` | the term's likelihood to the power W > 0 (its weight in the ``WeightedSum``), e.g. ``value*arith*certainty^20`` |

A product is a product of experts: each term multiplies the likelihood that
the partial answer is good, so a step the arithmetic checker rejects keeps
its zero and the value ranks the steps it accepts. A ``*`` splits a spec only
when every part starts with a known kind, so ``verify:2*3`` is one verifier.
An exponent weighs a term against the others (a tempered likelihood):
self-certainty's per-token means differ by about 0.1 nat between answers,
so in a product with a probability-scale term it moves the result only with
a large exponent, as in ``certainty^20``. The terms whose
argument is free text (``verify``, ``embed``) take no exponent, so
``verify:2^10`` is one verifier of the answer 2^10.

MODEL is anything ``piscale.lm.load`` accepts (a catalog name, a GGUF file, a
folder, a hub id). Backends are built with ``load_lm`` (default
``piscale.lm.load`` on ``device``), so a caller can share or fake them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from piscale.lm.base import LanguageModel
from piscale.rewards.base import Reward

KINDS = ("judge", "prm", "cdr", "verify", "arith", "embed", "certainty", "value", "final")
FREE_TEXT_KINDS = ("verify", "embed")
"""Kinds whose argument is free text, where ``*`` and ``^`` belong to it."""


def from_spec(
    spec: str,
    *,
    policy: LanguageModel | None = None,
    policy_spec: str | None = None,
    device: str = "cpu",
    load_lm: Callable[[str], LanguageModel] | None = None,
    trust_remote_code: bool = False,
) -> Reward:
    """The reward a spec names (see the module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward spec must be a non-empty string; kinds: {', '.join(KINDS)}")
    terms = [split_exponent(term) for term in product_terms(spec)]
    if len(terms) > 1 or terms[0][1] != 1.0:
        from piscale.rewards.compose import WeightedSum

        options = dict(policy=policy, policy_spec=policy_spec, device=device, load_lm=load_lm,
                       trust_remote_code=trust_remote_code)
        return WeightedSum([(weight, from_spec(term, **options)) for term, weight in terms])
    spec = terms[0][0]
    kind, argument = kind_and_argument(spec)
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r} in {spec!r}; expected one of {', '.join(KINDS)}")

    def need_argument(what: str) -> None:
        if not argument:
            raise ValueError(f"the reward spec {spec!r} needs {what} after '{kind}:'")

    def backend(model: str) -> LanguageModel:
        if policy is not None and policy_spec is not None and model == policy_spec:
            return policy
        if load_lm is not None:
            return load_lm(model)
        from piscale.lm import load

        return load(model, device=device)

    if kind == "arith":
        if argument:
            raise ValueError(f"'arith' takes no argument, got {spec!r}")
        from piscale.rewards.verify import ArithmeticReward

        return ArithmeticReward()
    if kind == "certainty":
        return _certainty(spec, argument)
    if kind == "verify":
        need_argument("the reference answer (verify:ANSWER)")
        from piscale.rewards.verify import VerifierReward

        return VerifierReward(argument)
    if kind == "judge":
        need_argument("a model (judge:MODEL)")
        from piscale.rewards.judge import LLMJudge

        return LLMJudge(backend(argument))
    if kind == "cdr":
        models = [m.strip() for m in argument.split(",")]
        if len(models) != 2 or not all(models):
            raise ValueError(f"the reward spec {spec!r} must name two models: cdr:STRONG,WEAK")
        from piscale.rewards.cdr import DEFAULT_CRITERIA, DensityRatioReward

        strong = backend(models[0])
        weak = strong if models[1] == models[0] else backend(models[1])
        return DensityRatioReward(strong, weak, criteria=DEFAULT_CRITERIA)
    if kind == "embed":
        need_argument("attribute descriptions (embed:POSITIVE|NEGATIVE)")
        positive_text, _, negative_text = argument.partition("|")
        positive = [p.strip() for p in positive_text.split(";") if p.strip()]
        negative = [n.strip() for n in negative_text.split(";") if n.strip()]
        if not positive:
            raise ValueError(f"the reward spec {spec!r} has no positive description before '|'")
        from piscale.rewards.embed import EmbeddingReward

        return EmbeddingReward(positive, negative, device=device)
    if kind == "final":
        need_argument("the reward that judges the answer (final:SPEC)")
        from piscale.rewards.compose import Terminal

        return Terminal(
            from_spec(argument, policy=policy, policy_spec=policy_spec, device=device, load_lm=load_lm,
                      trust_remote_code=trust_remote_code)
        )
    if kind == "value":
        from piscale.rewards.value import load_value_reward

        return load_value_reward(argument or None, device=device)
    # prm
    need_argument("a model (prm:MODEL)")
    from piscale.rewards.prm import load_prm

    return load_prm(_prm_source(argument), device=device, trust_remote_code=trust_remote_code)


LOG_SCALE_KINDS = ("certainty", "cdr", "embed")
"""Kinds whose scores are log-potentials; the others are probabilities."""


def spec_scale(spec: str) -> str:
    """The scale of the reward a spec names, without building it: a product
    or a weighted term is on the log scale (``WeightedSum``), as are a
    ``final:`` term and the kinds in ``LOG_SCALE_KINDS``."""
    terms = [split_exponent(term) for term in product_terms(spec)]
    if len(terms) > 1 or terms[0][1] != 1.0:
        return "log"
    term = terms[0][0]
    final = kind_and_argument(term)[0] == "final"
    return "log" if final or term_kind(term) in LOG_SCALE_KINDS else "probability"


def product_terms(spec: str) -> list[str]:
    """The terms of a product spec (``value*arith`` -> ``["value", "arith"]``),
    or ``[spec]`` when it is one reward: a ``*`` splits only where every part
    starts with a known kind, so a verifier's answer may hold one."""
    parts = [part.strip() for part in spec.split("*")]
    if len(parts) > 1 and all(term_kind(part) in KINDS for part in parts):
        return parts
    return [spec.strip()]


def term_kind(term: str) -> str:
    """The reward kind a spec or product term starts with (``certainty^20`` ->
    ``certainty``); a ``final:`` term is of the kind it wraps, so that
    ``final:verify:2^10`` is one verifier and a server sees what it loads."""
    kind, argument = kind_and_argument(term)
    return term_kind(argument) if kind == "final" and argument else kind


def kind_and_argument(term: str) -> tuple[str, str]:
    """A term's own kind and its argument, both stripped, the kind in lower
    case and without an exponent: ``Final: certainty^10`` -> (``final``,
    ``certainty^10``), ``arith^2`` -> (``arith``, ``""``)."""
    kind, _, argument = term.strip().partition(":")
    return kind.partition("^")[0].strip().lower(), argument.strip()


def split_exponent(term: str) -> tuple[str, float]:
    """A product term's own spec and its exponent: ``certainty^20`` ->
    (``certainty``, 20.0); 1 where it has none, or where its kind's argument
    is free text (``verify:2^10`` is one verifier)."""
    term = term.strip()
    base, caret, power = term.rpartition("^")
    if not caret or term_kind(term) in FREE_TEXT_KINDS or term_kind(term) not in KINDS:
        return term, 1.0
    try:
        weight = float(power)
    except ValueError:
        raise ValueError(f"the exponent in {term!r} must be a number (SPEC^W), got {power.strip()!r}") from None
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the exponent in {term!r} must be a positive finite number, got {power.strip()!r}")
    return base.strip(), weight


def _certainty(spec: str, argument: str) -> Reward:
    """``certainty``, ``certainty:mean``, ``certainty:group`` or ``certainty:group:WINDOW``."""
    from piscale.rewards.certainty import DEFAULT_WINDOW, STATISTICS, SelfCertaintyReward

    statistic, _, window = (part.strip() for part in argument.partition(":"))
    statistic = statistic.lower() or "mean"
    if statistic not in STATISTICS:
        raise ValueError(f"unknown self-certainty statistic {statistic!r} in {spec!r}; choose one of {', '.join(STATISTICS)}")
    if window and statistic != "group":
        raise ValueError(f"only 'certainty:group' takes a window, got {spec!r}")
    if window and not (window.isdigit() and int(window) > 0):
        raise ValueError(f"the window in {spec!r} must be a positive number of tokens (certainty:group:WINDOW)")
    return SelfCertaintyReward(statistic, int(window) if window else DEFAULT_WINDOW)


def _prm_source(model: str) -> str:
    """A folder or hub id transformers can load a PRM from."""
    from piscale import models

    resolved = models.resolve(model)
    if resolved.gguf_file is not None:
        raise ValueError(
            f"{model!r} is a GGUF file; PRMs load from a transformers folder or hub id "
            "(a GGUF file holds no classification head)"
        )
    if resolved.kind == "hub":
        return resolved.hub_id or model
    return str(resolved.path)
