"""The public Python API: the names ``import piscale`` offers, and what the
entry points pass on to the reward and the search."""

from __future__ import annotations

import subprocess
import sys

import pytest

import piscale
from piscale import api
from piscale.lm.toy import ToyLM

PUBLIC = [
    "ALGORITHMS",
    "Candidate",
    "DEFAULT_MODEL",
    "DEFAULT_REWARD",
    "LanguageModel",
    "Reward",
    "SearchResult",
    "Settings",
    "StepParams",
    "__version__",
    "asolve",
    "asolve_many",
    "load_lm",
    "load_reward",
    "load_task",
    "sample",
    "solve",
    "solve_many",
]


def test_the_public_names_are_pinned() -> None:
    assert sorted(piscale.__all__) == sorted(PUBLIC)
    assert sorted(dir(piscale)) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(piscale, name) is not None
    assert piscale.solve is api.solve and piscale.SearchResult.__name__ == "SearchResult"
    with pytest.raises(AttributeError, match="no attribute 'solver'"):
        piscale.solver  # noqa: B018


def test_importing_piscale_loads_no_torch() -> None:
    code = "import sys, piscale; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_solve_runs_a_search_and_returns_its_result() -> None:
    lm = ToyLM()
    result = piscale.solve("2 + 3", model=lm, reward="arith", algorithm="pf", budget=4, seed=3, trace=True)
    again = api.solve("2 + 3", model=lm, reward="arith", algorithm="pf", budget=4, seed=3)
    assert result.algorithm == "pf" and result.budget == 4 and len(result.candidates) == 4
    assert result.text == again.text and result.answer == again.answer
    assert result.trace is not None and again.trace is None
    reports = []
    api.solve("2 + 3", model=lm, reward="arith", budget=4, seed=3, progress=lambda i, s: reports.append((i, s)))
    assert [s["step"] for _, s in reports] == list(range(1, len(reports) + 1))
    assert {i for i, _ in reports} == {0}
    assert reports[-1][1]["finished"] == 4 and reports[-1][1]["generated_tokens"] == result.usage["generated_tokens"]


class _Captured(Exception):
    pass


@pytest.mark.parametrize(
    ("policy_device", "asked", "expected"), [("cuda:1", None, "cuda:1"), (None, None, "cpu"), ("cuda:0", "cpu", "cpu")]
)
def test_the_reward_follows_the_policy_device_and_trusts_code_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, policy_device, asked, expected
) -> None:
    import piscale.rewards

    seen = {}

    def from_spec(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        raise _Captured

    monkeypatch.setattr(piscale.rewards, "from_spec", from_spec)
    lm = ToyLM()
    lm.device = policy_device
    with pytest.raises(_Captured):
        piscale.solve("2 + 3", model=lm, reward="prm:some/prm", device=asked)
    assert seen["spec"] == "prm:some/prm" and seen["device"] == expected and seen["trust_remote_code"] is False
    with pytest.raises(_Captured):
        piscale.solve("2 + 3", model=lm, reward="prm:some/prm", device=asked, trust_remote_code=True)
    assert seen["trust_remote_code"] is True
