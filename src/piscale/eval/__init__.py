"""The evaluation harness: accuracy versus compute, stored so no result is lost.

* ``tasks``: MATH500, GSM8K, AIME 2024, AMC 2023 and files of the same
  shapes; the paper's prompt.
* ``grid``: the grid of algorithms x budgets x seeds, its configuration and
  each algorithm's options; ``identity``: what keys a configuration (model
  and reward files by hash).
* ``runner``: the grid planned against the database and run, batched through
  ``piscale.search.run_many``, resumable.
* ``store``: SQLite in WAL mode; every result committed at once.
* ``grade`` and ``subsample``: grading through ``piscale.grading`` and the
  budgets of best-of-N, weighted best-of-N and self-consistency computed from
  the samples of one run.
* ``report``: accuracy tables with confidence intervals, and plots
  (``stats``, ``summary``, ``render``, ``plots``).

The command line is ``piscale eval`` and ``piscale report``.
"""

from piscale.eval.grade import grade, rows_from_result
from piscale.eval.grid import EvalConfig, EvalError, Grid, Job
from piscale.eval.report import Group, markdown, summarize, wilson_interval, write_plots
from piscale.eval.runner import Evaluation
from piscale.eval.store import ResultRow, ResultStore, StoreError
from piscale.eval.subsample import Samples, expected_accuracy, first_subset_choice
from piscale.tasks import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    Problem,
    Task,
    TaskError,
    format_prompt,
    load_task,
)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "EvalConfig",
    "EvalError",
    "Evaluation",
    "Grid",
    "Group",
    "Job",
    "Problem",
    "ResultRow",
    "ResultStore",
    "Samples",
    "StoreError",
    "Task",
    "TaskError",
    "expected_accuracy",
    "first_subset_choice",
    "format_prompt",
    "grade",
    "load_task",
    "markdown",
    "rows_from_result",
    "summarize",
    "wilson_interval",
    "write_plots",
]
