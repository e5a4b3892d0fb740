"""Supervised fine-tuning with transformers' ``Trainer``, by the recipe.

    examples  = the data files' conversations, tokenised (completion-only labels)
    order     = every epoch's shuffle of them, drawn up front from the seed
    Trainer   : AdamW, constant learning rate, no warm-up,
                ``examples_per_step`` examples per step in micro-batches,
                gradient clipping; the order is read sequentially
    every step -> OUT/metrics.jsonl (loss, gradient norm, learning rate)
    every ``save_every`` steps -> OUT/checkpoints/checkpoint-N (weights,
                optimiser, RNG states: what resuming needs)
    the end   -> OUT: the model and tokenizer (a piscale model folder),
                OUT/sft.json (recipe, data, steps, time), OUT/metrics.png

Running the same command on the same OUT after a kill resumes from the last
checkpoint: the metrics of steps after it are dropped and trained again, the
order is the same, and so is the final model (``tests/test_sft.py`` checks it
against an uninterrupted run).

The loss of a step is the mean cross-entropy over the completion tokens of
all its examples (the Trainer normalises by the tokens of the whole
accumulated batch, so a long answer weighs by its length, as in one big
batch); the gradient norm is measured before clipping.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from piscale.recipe import Recipe, RecipeError
from piscale.sft.data import IGNORE, DataError, Tokenised, read_examples, tokenise, training_order

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "sft.json"


@dataclass
class SFTRecipe(Recipe):
    """The shared recipe (``piscale.recipe``) and what is particular to SFT."""

    phased: bool = False
    """train on the data files one after another (phases) instead of stacked."""
    completion_only: bool = True
    """loss on the assistant's tokens only (False: on every token)."""
    max_length: int = 2048
    """longest example in tokens; longer ones are refused, never cut."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.examples_per_step % self.micro_batch:
            raise RecipeError(
                f"examples_per_step ({self.examples_per_step}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        if self.max_length < 2:
            raise RecipeError(f"max_length must be >= 2, got {self.max_length}")

    @property
    def accumulation(self) -> int:
        return self.examples_per_step // self.micro_batch


@dataclass
class StepMetrics:
    step: int
    epoch: float
    """examples trained on so far over the examples in one epoch of all data."""
    loss: float
    grad_norm: float
    """before clipping."""
    learning_rate: float
    seconds: float
    """wall time of this step."""


@dataclass
class Run:
    """What a call of ``train`` left in its folder."""

    out: Path
    steps: int
    """optimiser steps done so far."""
    total_steps: int
    finished: bool
    metrics: list[StepMetrics]


def total_steps(examples: int, recipe: SFTRecipe) -> int:
    """Optimiser steps of a run over ``examples`` examples (all epochs): the
    last step takes what is left."""
    return math.ceil(math.ceil(examples / recipe.micro_batch) / recipe.accumulation)


def read_metrics(out: str | os.PathLike) -> list[StepMetrics]:
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    return [StepMetrics(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


class SequenceDataset(torch.utils.data.Dataset):
    """The tokenised examples in training order (the order repeats epochs)."""

    def __init__(self, items: Sequence[Tokenised]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels}


def pad_batch(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (IGNORE on padding)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[i, :n] = torch.tensor(feature["input_ids"])
        labels[i, :n] = torch.tensor(feature["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_data(paths: Sequence[str | os.PathLike], tokenizer, recipe: SFTRecipe) -> list[Tokenised]:
    """Every example of every phase in training order (all epochs)."""
    if not paths:
        raise DataError("no data files given")
    phases = []
    for path in paths:
        tokenised = [tokenise(e, tokenizer, recipe.max_length) for e in read_examples(path)]
        if not recipe.completion_only:
            tokenised = [Tokenised(t.input_ids, list(t.input_ids)) for t in tokenised]
        phases.append(tokenised)
    order = training_order([len(p) for p in phases], recipe.epochs, recipe.seed, phased=recipe.phased)
    return [phases[p][i] for p, i in order]


def train(
    model,
    tokenizer,
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    recipe: SFTRecipe,
    *,
    stop_at_step: int | None = None,
    save_every: int = 10,
    keep_checkpoints: bool = False,
    provenance: dict | None = None,
    progress: Callable[[StepMetrics], None] | None = None,
) -> Run:
    """Fine-tune ``model`` (a transformers causal LM; its weights change in
    place) on ``data``, or resume the run in ``out``. With ``stop_at_step``
    the run stops after that step, saving a checkpoint to continue from;
    otherwise it runs to the end and saves the model to ``out``."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    out = Path(out)
    examples = load_data(data, tokenizer, recipe)
    steps = total_steps(len(examples), recipe)
    if save_every < 1:
        raise RecipeError(f"save_every must be >= 1, got {save_every}")
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != asdict(recipe):
        raise RecipeError(f"{out} holds a run with another recipe ({recipe_file}); name a new folder")
    recipe_file.write_text(json.dumps(asdict(recipe), indent=2))
    checkpoints = out / CHECKPOINTS
    resume = _latest_checkpoint(checkpoints)
    done = _trim_metrics(out, resume)
    if done >= steps and (out / SUMMARY).is_file():
        return Run(out, done, steps, True, read_metrics(out))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_epoch = len(examples) / recipe.epochs

    class Record(TrainerCallback):
        """Appends each step's metrics to OUT/metrics.jsonl; stops when asked."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "grad_norm" in logs:
                now = time.perf_counter()
                step = StepMetrics(
                    step=state.global_step,
                    epoch=min(state.global_step * recipe.examples_per_step, len(examples)) / per_epoch,
                    loss=float(logs["loss"]),
                    grad_norm=float(logs["grad_norm"]),
                    learning_rate=float(logs["learning_rate"]),
                    seconds=now - self.last,
                )
                self.last = now
                with (out / METRICS).open("a") as handle:
                    handle.write(json.dumps(asdict(step)) + "\n")
                if progress is not None:
                    progress(step)

        def on_step_end(self, args, state, control, **kwargs):
            if stop_at_step is not None and state.global_step >= stop_at_step:
                control.should_save = True
                control.should_training_stop = True
            return control

    class InOrder(Trainer):
        # The order is drawn up front (``training_order``); read it as is.
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    device = next(model.parameters()).device
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=recipe.micro_batch,
        gradient_accumulation_steps=recipe.accumulation,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        num_train_epochs=1,  # the order already holds every epoch
        max_grad_norm=recipe.max_grad_norm,
        weight_decay=recipe.weight_decay,
        optim="adamw_torch",
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = InOrder(
        model=model,
        args=arguments,
        train_dataset=SequenceDataset(examples),
        data_collator=lambda features: pad_batch(features, pad_id),
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    trainer.remove_callback(PrinterCallback)  # ``progress`` reports steps; the Trainer would print each log dict too
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    done = trainer.state.global_step
    if trainer.state.max_steps != steps:
        raise RuntimeError(f"the Trainer planned {trainer.state.max_steps} steps, piscale {steps}")
    metrics = read_metrics(out)
    if done < steps:
        return Run(out, done, steps, False, metrics)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "recipe": asdict(recipe),
        "data": [str(p) for p in data],
        "examples": len(examples) // recipe.epochs,
        "steps": steps,
        "train_seconds": sum(m.seconds for m in metrics),
        "final_loss": metrics[-1].loss if metrics else None,
        **(provenance or {}),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    from piscale.sft.plots import plot_runs

    plot_runs({out.name or "run": metrics}, out / "metrics.png")
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return Run(out, done, steps, True, metrics)


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _trim_metrics(out: Path, checkpoint: Path | None) -> int:
    """Keep the metrics of the steps the checkpoint holds (those after it
    will be trained again); return that many steps. A finished run keeps all."""
    metrics = read_metrics(out)
    if (out / SUMMARY).is_file():
        return len(metrics)
    step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
    kept = [m for m in metrics if m.step <= step]
    (out / METRICS).write_text("".join(json.dumps(asdict(m)) + "\n" for m in kept))
    return step


def completion_loss(model, tokenizer, paths: Sequence[str | os.PathLike], recipe: SFTRecipe) -> float:
    """Mean cross-entropy per completion token of the examples in ``paths``
    (each once, no shuffling): the held-out loss that ranks finished runs."""
    items = [tokenise(e, tokenizer, recipe.max_length) for path in paths for e in read_examples(path)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), recipe.micro_batch):
            batch = pad_batch([{"input_ids": t.input_ids, "labels": t.labels} for t in items[start : start + recipe.micro_batch]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total += float(losses)
            count += int((targets != IGNORE).sum())
    return total / count
