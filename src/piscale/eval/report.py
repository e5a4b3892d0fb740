"""Accuracy-versus-compute reports from a results database.

For every configuration (dataset, model, reward, prompts) in the database,
the report gives, per algorithm (with its search options, if any) and budget:

* accuracy: each problem's score averaged over its seeds, then averaged over
  problems; with a 95% Wilson score interval that treats problems as the
  independent units (n = number of problems). A score in [0, 1] with mean p
  has variance at most p(1 - p), the Bernoulli variance the Wilson interval
  assumes, so averaging seeds or subsets within a problem can only make the
  true variance smaller than the one the interval allows for;
* generated tokens per problem (mean over problems and seeds);
* the number of problems and seeds behind the cell, and the searches that
  failed and are missing;
* paired differences at equal budget between a reference algorithm (``pf``
  by default) and each other one: the mean over problems of the difference
  in their scores, with a 95% normal interval from the spread of the
  per-problem differences. Pairing by problem removes the variation between
  problems that separate intervals carry, so it tells two algorithms apart
  on far fewer problems;

a table of what the stored searches ended with (their final candidates:
distinct answers, whether a correct one is among them, whether the largest
weight was shared by different answers; :class:`Population`), and plots of
accuracy against budget and against generated tokens, one line per
algorithm, with the interval as a band (PNG and SVG).

Two kinds of rows are derived from the stored searches, at no generation
cost (``derived=True``), and marked in the tables:

* re-chosen (†): particle filtering, particle Gibbs and parallel tempering
  choose their answer from the final population after the last step, by the
  heaviest particle (``selection=max-weight``, the default) or by a weighted
  vote over answers. Every stored search of theirs therefore also gives the
  answer of the other rule, exactly as a search with that option would have
  (same seed, same particles). These rows go under the variant with that
  option, unless the database stores that variant itself
  (:data:`RESELECTION_NOTE`);
* ``pass@n`` (‡): the share of the best-of-N samples' b-subsets that hold a
  correct answer, what a perfect reward would reach from them
  (:data:`PASS_AT_NOTE`). It is an upper bound for the selections, not an
  algorithm, and is left out of the paired comparisons.

By default only the problems present in every cell of a configuration are
counted (``common=True``), so all cells, and the pairs, compare the same
problems while a run is still filling its grid.

The score of a row is ``expected_accuracy`` by default. For algorithms that
run at each budget it is the 0/1 grade; for the subsampled baselines
(``bon``, ``wbon``, ``sc``) it is the mean over subsets described in
:data:`SUBSAMPLING_NOTE`. ``estimator="first"`` uses instead the grade of the
answer picked from the first b samples, search-and-learn's estimate.

The report's parts each have a module: :mod:`piscale.eval.stats` (the
intervals), :mod:`piscale.eval.summary` (results into groups and cells),
:mod:`piscale.eval.render` (tables, Markdown, terminal, JSON) and
:mod:`piscale.eval.plots`; this module names them together for the
``piscale report`` command.
"""

from piscale.eval.plots import write_plots
from piscale.eval.render import (
    DERIVED_MARKS,
    INTERVAL_NOTE,
    PASS_AT_NOTE,
    RESELECTION_NOTE,
    SUBSAMPLING_NOTE,
    Table,
    markdown,
    print_report,
    tables,
    write_json,
)
from piscale.eval.stats import Z_95, paired_difference, wilson_interval
from piscale.eval.summary import ESTIMATORS, PASS_AT, RECHOSEN, Cell, Comparison, Group, Population, summarize

__all__ = [
    "DERIVED_MARKS",
    "ESTIMATORS",
    "INTERVAL_NOTE",
    "PASS_AT",
    "PASS_AT_NOTE",
    "RECHOSEN",
    "RESELECTION_NOTE",
    "SUBSAMPLING_NOTE",
    "Z_95",
    "Cell",
    "Comparison",
    "Group",
    "Population",
    "Table",
    "markdown",
    "paired_difference",
    "print_report",
    "summarize",
    "tables",
    "wilson_interval",
    "write_json",
    "write_plots",
]
