r"""BRAIn: distil the reward-tilted posterior into the policy (Pandey et al., 2024).

The target is the posterior the particle methods sample,

    p(y | x, G=1)  ∝  p_sft(y | x) · exp(r(x, y) / β),

and the policy π_θ is fitted to it by self-normalised importance sampling.
For each prompt x, responses y_1..y_n are drawn from a proposal q; here q is
the model being trained, before training (p_sft), sampled at temperature 1
with no top-p cut, so that q = p_sft exactly. Then

    α_i    = softmax_i( log p_sft(y_i|x) + r_i/β - log q(y_i|x) ) = softmax_i( r_i / β )
    b_i(θ) = softmax_i( log π_θ(y_i|x) - log q(y_i|x) )
    L(θ)   = - Σ_i α_i log b_i(θ),      ∇L = Σ_i (b_i - α_i) ∇ log π_θ(y_i|x).

At θ = θ_sft every b_i is 1/n, so the first loss is log n. With n = 2 and
α = (1, 0) the loss is -log σ(Δ_1 - Δ_2), Δ_i = log π_θ(y_i|x) - log p_sft(y_i|x):
DPO's loss with β = 1.

r_i is the log-potential of the reward's score (the score itself on a log
scale, such as a density ratio; its log on a probability scale, so that
exp(r/β) = score^{1/β}, the particle filter's tilt).

The samples come from ``piscale annotate`` run at temperature 1 (its output
records how it sampled; other files are refused). Every prompt with at least
two scored responses is used, tied or not: ties give a uniform α, which
still pulls π_θ towards p_sft's relative preferences among the responses.

The optimiser follows the recipe of Pareja et al. (2024) for small models
(``piscale.recipe``): AdamW at a constant learning rate without warm-up,
large effective batches through gradient accumulation, and per-step loss
and gradient norm recorded, since early in training a lower gradient norm
and a higher loss predict a better final model.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from piscale.annotate import skipped_path
from piscale.recipe import Recipe as TrainingRecipe
from piscale.recipe import RecipeError
from piscale.smc import effective_sample_size, log_reward, normalize


class DistillError(ValueError):
    """Unusable samples or settings; the message says which and why."""


@dataclass(frozen=True)
class Group:
    """One prompt's scored responses (only those with a finite score)."""

    id: str
    prompt: str
    system: str | None
    responses: tuple[str, ...]
    finished: tuple[bool, ...]
    """True where the response ended with end-of-sequence (its EOS token is
    part of y and counted in log π(y|x))."""
    token_ids: tuple[tuple[int, ...] | None, ...]
    """each response's tokens as sampled (EOS included), when recorded; else
    the text is re-tokenised and EOS appended to finished responses."""
    log_rewards: tuple[float, ...]
    """r_i: the log-potential of each response's score."""


@dataclass
class Recipe(TrainingRecipe):
    """The shared optimiser recipe (``piscale.recipe``; an example is one
    prompt with its responses) and BRAIn's temperature."""

    beta: float = 1.0
    """temperature of the tilt exp(r/β): smaller follows the reward harder."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except RecipeError as error:
            raise DistillError(str(error)) from error
        if not self.beta > 0:
            raise DistillError(f"beta must be > 0, got {self.beta}")


@dataclass
class StepMetrics:
    epoch: int
    step: int
    loss: float
    grad_norm: float
    """before clipping."""
    target_ess: float
    """mean effective sample size of α per prompt: near 1 the tilt is so sharp
    that only the best response counts (raise β); near n it is flat."""
    seconds: float


# -- the loss ---------------------------------------------------------------


def brain_loss(
    policy_logprobs: torch.Tensor, reference_logprobs: torch.Tensor, log_rewards: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """L = -Σ_i α_i log b_i(θ) for each prompt (row), with α = softmax(r/β)
    and b = softmax(log π_θ - log p_sft) over the row's responses; padded
    entries have ``log_rewards = -inf``. Returns one loss per row."""
    valid = torch.isfinite(log_rewards)
    alpha = torch.softmax(log_rewards / beta, dim=-1)
    ratios = torch.where(valid, policy_logprobs - reference_logprobs, torch.full_like(policy_logprobs, -math.inf))
    log_b = torch.log_softmax(ratios, dim=-1)
    return -(alpha * torch.where(valid, log_b, torch.zeros_like(log_b))).sum(dim=-1)


# -- the samples ------------------------------------------------------------


def load_groups(paths: Sequence[str | os.PathLike], policy: str | None = None) -> tuple[list[Group], dict[str, int]]:
    """The scored responses of ``piscale annotate`` output files (each file's
    ``.skipped.jsonl`` companion is read too: tied prompts count here).
    Refuses samples not drawn from ``policy`` at temperature 1 with no top-p
    cut, since then q would not be p_sft."""
    groups: list[Group] = []
    left_out: dict[str, int] = {}
    seen: set[str] = set()
    files = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DistillError(f"no annotation file at {path}")
        files.append(path)
        if skipped_path(path).is_file() and skipped_path(path) not in files:
            files.append(skipped_path(path))
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DistillError(f"{where}: not valid JSON ({error})") from error
            if record.get("policy") == "given":
                reason = "responses given, not sampled from the model"
                left_out[reason] = left_out.get(reason, 0) + 1
                continue
            group = _group(record, where, policy)
            if group.id in seen:
                raise DistillError(f"{where}: prompt {group.id!r} appears twice; pass each annotation once")
            seen.add(group.id)
            if len(group.responses) < 2:
                reason = "fewer than two scored responses"
                left_out[reason] = left_out.get(reason, 0) + 1
                continue
            groups.append(group)
    if not groups:
        raise DistillError(f"no prompt in {', '.join(map(str, paths))} has two scored responses")
    return groups, left_out


def _group(record: dict, where: str, policy: str | None) -> Group:
    sampling = record.get("sampling")
    if not isinstance(sampling, dict) or "responses" not in record:
        raise DistillError(f"{where}: not a piscale annotate record with sampled responses")
    if sampling.get("temperature") != 1.0 or sampling.get("top_p") != 1.0:
        raise DistillError(
            f"{where}: responses were sampled at temperature {sampling.get('temperature')}, top_p "
            f"{sampling.get('top_p')}; BRAIn's weights assume samples from the model itself: annotate with "
            "--temperature 1 --top-p 1"
        )
    if policy is not None and record.get("policy") != policy:
        raise DistillError(
            f"{where}: responses were sampled from {record.get('policy')!r}, but the model trained is {policy!r}; "
            "the proposal must be the model before training"
        )
    scale = record.get("reward_scale")
    if scale not in ("log", "probability"):
        raise DistillError(f"{where}: the record does not say its reward's scale (log or probability)")
    kept = [r for r in record["responses"] if r.get("score") is not None]
    with np.errstate(divide="ignore"):
        rewards = log_reward(np.array([r["score"] for r in kept], dtype=float), scale) if kept else np.zeros(0)
    keep = np.isfinite(rewards)
    kept = [r for r, k in zip(kept, keep) if k]
    return Group(
        id=str(record["id"]),
        prompt=record["prompt"],
        system=record.get("system"),
        responses=tuple(r["text"] for r in kept),
        finished=tuple(r.get("finish_reason") == "eos" for r in kept),
        token_ids=tuple(None if r.get("token_ids") is None else tuple(r["token_ids"]) for r in kept),
        log_rewards=tuple(float(v) for v in rewards[keep]),
    )


# -- training ---------------------------------------------------------------


class _Encoded:
    """Token ids of every (context, response) of some groups, for
    ``sequence_logprobs``."""

    def __init__(self, lm, groups: Sequence[Group]):
        eos = lm.tokenizer.eos_token_id
        self.contexts, self.responses, self.shape = [], [], []
        for group in groups:
            context = lm.prompt_ids(group.prompt, group.system)
            for text, finished, ids in zip(group.responses, group.finished, group.token_ids):
                self.contexts.append(context)
                if ids is not None:
                    self.responses.append(list(ids))
                else:
                    self.responses.append(lm.encode(text) + ([eos] if finished and eos is not None else []))
            self.shape.append(len(group.responses))


def sequence_logprobs(model, contexts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """log π(response | context) for each pair, summed over the response
    tokens, in one right-padded forward pass (differentiable)."""
    device = next(model.parameters()).device
    rows = [c + r for c, r in zip(contexts, responses)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    wanted = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, (context, response) in enumerate(zip(contexts, responses)):
        ids[i, : len(context) + len(response)] = torch.tensor(context + response, device=device)
        mask[i, : len(context) + len(response)] = 1
        wanted[i, len(context) : len(context) + len(response)] = True
    # Only positions from the shortest context on predict response tokens:
    # the vocabulary-wide logits of the rest (most of the memory) are never made.
    first = min(map(len, contexts)) - 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=width - first).logits
    logits = logits[:, :-1].float()
    targets = ids[:, first + 1 :]
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return (token_logprobs * wanted[:, first + 1 :]).sum(dim=-1)


def distill(
    lm,
    groups: Sequence[Group],
    recipe: Recipe,
    *,
    out: str | os.PathLike | None = None,
    progress: Callable[[StepMetrics], None] | None = None,
) -> list[StepMetrics]:
    """Fit ``lm`` (a ``TransformersLM``; its weights change in place) to the
    tilted posterior of ``groups``. With ``out``, the model and tokenizer are
    saved there after every epoch and the per-step metrics are appended to
    ``out/metrics.jsonl`` as they come.

        log p_sft(y_i|x) for every response, once, before any update
        for each epoch, for each step of ``examples_per_step`` shuffled prompts:
            accumulate ∇ mean_x L_x(θ) over micro-batches; clip; AdamW step

    The model stays in eval mode: dropout would make log π_θ differ from
    log p_sft at θ_sft, so b would not start uniform (nor the loss at log n).
    """
    if lm.live_sequences:
        raise DistillError("the model holds live sequences; release them before training its weights")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    with torch.no_grad():
        reference = {
            group.id: values.detach()
            for chunk in _chunks(groups, recipe.micro_batch)
            for group, values in zip(chunk, _group_logprobs(lm, chunk))
        }
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    metrics: list[StepMetrics] = []
    for epoch in range(1, recipe.epochs + 1):
        shuffled = [groups[i] for i in rng.permutation(len(groups))]
        for batch in _chunks(shuffled, recipe.examples_per_step):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in _chunks(batch, recipe.micro_batch):
                losses = _losses(lm, chunk, reference, recipe.beta)
                (losses.sum() / len(batch)).backward()  # the step's loss is the mean over its prompts
                total += float(losses.detach().sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(lm.model.parameters(), recipe.max_grad_norm))
            optimizer.step()
            ess = [effective_sample_size(normalize(np.array(g.log_rewards) / recipe.beta)) for g in batch]
            step = StepMetrics(
                epoch=epoch, step=len(metrics) + 1, loss=total / len(batch), grad_norm=grad_norm,
                target_ess=float(np.mean(ess)), seconds=time.perf_counter() - started,
            )
            metrics.append(step)
            if out_dir is not None:
                with (out_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(asdict(step)) + "\n")
            if progress is not None:
                progress(step)
        if out_dir is not None:
            lm.model.save_pretrained(out_dir)
            lm.tokenizer.save_pretrained(out_dir)
    return metrics


def _chunks(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _group_logprobs(lm, groups: Sequence[Group]) -> list[torch.Tensor]:
    """log π(y_i|x) of each group's responses under ``lm``'s current weights."""
    encoded = _Encoded(lm, groups)
    values = sequence_logprobs(lm.model, encoded.contexts, encoded.responses, lm.pad_token_id)
    return list(torch.split(values, encoded.shape))


def _losses(lm, groups: Sequence[Group], reference: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """BRAIn's loss of each group under ``lm``'s current weights."""
    policy = _group_logprobs(lm, groups)
    pad = torch.nn.utils.rnn.pad_sequence
    rewards = [torch.tensor(g.log_rewards, dtype=p.dtype, device=p.device) for g, p in zip(groups, policy)]
    return brain_loss(
        pad(policy, batch_first=True),
        pad([reference[g.id] for g in groups], batch_first=True),
        pad(rewards, batch_first=True, padding_value=-math.inf),
        beta,
    )
