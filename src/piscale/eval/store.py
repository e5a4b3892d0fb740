"""Evaluation results in SQLite, safe against kills and concurrent writers.

Five tables:

* ``configs``: what determines a result apart from the grid cell: the
  dataset fingerprint, the model and reward (with their identities, file
  hashes where known) and the prompts. Their hash, the *config key*, is part
  of every result's key, so a changed model or prompt never resumes from
  results of another one.
* ``searches``: one per search actually run, (problem, algorithm, variant,
  run budget, seed), holding the whole ``SearchResult`` as JSON: every
  candidate, usage, settings, and the trace when asked for.
* ``results``: one graded row per (problem, algorithm, variant, budget,
  seed), the unit of the accuracy tables. The variant names the search
  options the algorithm ran with (empty for its defaults), so variants of one
  algorithm sit side by side. A search at budget N of best-of-N, weighted
  best-of-N or self-consistency yields rows for every budget up to N
  (``subsampled = 1`` for those below N; see ``piscale.eval.subsample``).
* ``runs``: one per invocation: its command line, grid, package versions,
  host, and the model and reward identities the loaded objects reported.
* ``failures``: every search that raised, with its error; a later run
  retries the cell, and a failure stays on record even once it succeeds.

Durability: the database is in WAL mode with ``synchronous=FULL``; a search
and all rows derived from it are written in one ``BEGIN IMMEDIATE``
transaction, so a process killed at any moment leaves either all of them or
none. Unique keys and ``INSERT OR IGNORE`` make writes idempotent, so two
processes running overlapping grids on one database both finish with each
cell stored exactly once (the first writer's result wins), and a resumed run
skips every cell already stored. Writers wait for each other up to
``busy_timeout``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS configs (
    config_key TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    reward TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_key TEXT NOT NULL REFERENCES configs(config_key),
    started_at REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS searches (
    search_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_key TEXT NOT NULL REFERENCES configs(config_key),
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    problem_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    variant TEXT NOT NULL,
    budget INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (config_key, problem_id, algorithm, variant, budget, seed)
);
CREATE TABLE IF NOT EXISTS failures (
    failure_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_key TEXT NOT NULL REFERENCES configs(config_key),
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    problem_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    variant TEXT NOT NULL,
    budget INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    result_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_key TEXT NOT NULL REFERENCES configs(config_key),
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    search_id INTEGER NOT NULL REFERENCES searches(search_id),
    problem_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    variant TEXT NOT NULL,
    budget INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    reference TEXT NOT NULL,
    answer TEXT,
    correct INTEGER NOT NULL,
    expected_accuracy REAL NOT NULL,
    subsampled INTEGER NOT NULL,
    samples_from INTEGER NOT NULL,
    subsets INTEGER NOT NULL,
    generated_tokens REAL NOT NULL,
    prompt_tokens REAL NOT NULL,
    reward_calls REAL NOT NULL,
    wall_time REAL NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (config_key, problem_id, algorithm, variant, budget, seed)
);
"""

CellKey = tuple[str, str, str, int, int]
"""(problem id, algorithm, variant, budget, seed): one cell of the grid. The
variant names the options an algorithm ran with (empty for its defaults)."""


class StoreError(RuntimeError):
    """The database is not a piscale results database, or is of another version."""


@dataclass(frozen=True)
class ResultRow:
    """One graded cell. For subsampled rows the costs are the run's costs
    scaled by budget / samples_from (the samples are i.i.d., so each costs
    the same in expectation)."""

    problem_id: str
    algorithm: str
    budget: int
    seed: int
    reference: str
    answer: str | None
    correct: bool
    expected_accuracy: float
    subsampled: bool
    samples_from: int
    subsets: int
    generated_tokens: float
    prompt_tokens: float
    reward_calls: float
    wall_time: float
    variant: str = ""

    @property
    def key(self) -> CellKey:
        return (self.problem_id, self.algorithm, self.variant, self.budget, self.seed)


class ResultStore:
    """A results database; open one per process (SQLite connections are not
    shared across processes or threads)."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        """Open (and, unless ``read_only``, create or upgrade to WAL) the
        database at ``path``. A read-only store never writes the file, not
        even its journal mode, so reports leave a copied or tracked
        database byte for byte as it was."""
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise StoreError(f"directory of {self.path} does not exist")
        if read_only and not self.path.is_file():
            raise StoreError(f"no results database at {self.path}")
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if read_only:
                self._db.execute("PRAGMA query_only = ON")
                self._check_schema()
                return
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._create_schema()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise StoreError(f"{self.path} is not a usable SQLite database: {error}") from error
        except StoreError:
            self._db.close()
            raise

    def _create_schema(self) -> None:
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self._check_schema()

    def _check_schema(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as error:  # no meta table: some other SQLite file
            raise StoreError(f"{self.path} is not a piscale results database ({error})") from error
        if row is None:
            raise StoreError(f"{self.path} is not a piscale results database (no schema version)")
        if int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {row[0]}; this piscale reads version {SCHEMA_VERSION}")

    # -- transactions ---------------------------------------------------------
    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing --------------------------------------------------------------
    def ensure_config(self, config_key: str, dataset: str, model: str, reward: str, description: Mapping) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO configs (config_key, dataset, model, reward, description, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (config_key, dataset, model, reward, _dumps(description), time.time()),
            )

    def start_run(self, config_key: str, info: Mapping) -> int:
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO runs (config_key, started_at, info) VALUES (?, ?, ?)",
                (config_key, time.time(), _dumps(info)),
            )
            return int(cursor.lastrowid)

    def update_run(self, run_id: int, info: Mapping) -> None:
        """Replace a run's info (e.g. with identities known only after loading)."""
        with self._transaction():
            self._db.execute("UPDATE runs SET info = ? WHERE run_id = ?", (_dumps(info), run_id))

    def save_search(
        self,
        config_key: str,
        run_id: int,
        cell: CellKey,
        result: Mapping,
        derive: Callable[[Mapping], Iterable[ResultRow]],
    ) -> int:
        """Store one search and the graded rows ``derive(result)`` makes from
        it, atomically. If another writer stored the same search first, the
        rows are derived from the stored result instead, so every row always
        agrees with the search it references. Returns the number of new rows."""
        problem_id, algorithm, variant, budget, seed = cell
        with self._transaction():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO searches (config_key, run_id, problem_id, algorithm, variant, budget, seed, "
                "result, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (config_key, run_id, problem_id, algorithm, variant, budget, seed, _dumps(result), time.time()),
            )
            if cursor.rowcount == 1:
                search_id = int(cursor.lastrowid)
            else:
                stored = self._db.execute(
                    "SELECT search_id, result FROM searches WHERE config_key = ? AND problem_id = ? "
                    "AND algorithm = ? AND variant = ? AND budget = ? AND seed = ?",
                    (config_key, problem_id, algorithm, variant, budget, seed),
                ).fetchone()
                search_id, result = int(stored["search_id"]), json.loads(stored["result"])
            inserted = 0
            now = time.time()
            for row in derive(result):
                values = asdict(row)
                values.update(
                    config_key=config_key,
                    run_id=run_id,
                    search_id=search_id,
                    created_at=now,
                    correct=int(row.correct),
                    subsampled=int(row.subsampled),
                )
                columns = ", ".join(values)
                marks = ", ".join("?" for _ in values)
                cursor = self._db.execute(
                    f"INSERT OR IGNORE INTO results ({columns}) VALUES ({marks})", tuple(values.values())
                )
                inserted += cursor.rowcount
            return inserted

    def record_failure(self, config_key: str, run_id: int, cell: CellKey, error: str) -> None:
        problem_id, algorithm, variant, budget, seed = cell
        with self._transaction():
            self._db.execute(
                "INSERT INTO failures (config_key, run_id, problem_id, algorithm, variant, budget, seed, error, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (config_key, run_id, problem_id, algorithm, variant, budget, seed, error, time.time()),
            )

    # -- reading --------------------------------------------------------------
    def unresolved_failures(self, config_key: str | None = None) -> list[dict]:
        """The latest failure of each search that has not been stored since."""
        query = (
            "SELECT f.* FROM failures f WHERE f.failure_id = (SELECT MAX(g.failure_id) FROM failures g "
            "WHERE g.config_key = f.config_key AND g.problem_id = f.problem_id AND g.algorithm = f.algorithm "
            "AND g.variant = f.variant AND g.budget = f.budget AND g.seed = f.seed) AND NOT EXISTS (SELECT 1 FROM "
            "searches s WHERE s.config_key = f.config_key AND s.problem_id = f.problem_id AND s.algorithm = "
            "f.algorithm AND s.variant = f.variant AND s.budget = f.budget AND s.seed = f.seed)"
        )
        if config_key:
            query += " AND f.config_key = ?"
        query += " ORDER BY f.failure_id"
        return [dict(r) for r in self._db.execute(query, (config_key,) if config_key else ())]

    def stored_cells(self, config_key: str, problem_ids: Iterable[str] | None = None) -> set[CellKey]:
        """The cells stored for a configuration (only those of ``problem_ids``
        when given: a cheap look-up through the unique key's index)."""
        query = "SELECT problem_id, algorithm, variant, budget, seed FROM results WHERE config_key = ?"
        parameters: list = [config_key]
        if problem_ids is not None:
            ids = list(problem_ids)
            query += f" AND problem_id IN ({', '.join('?' for _ in ids)})"
            parameters += ids
        rows = self._db.execute(query, parameters)
        return {(r["problem_id"], r["algorithm"], r["variant"], int(r["budget"]), int(r["seed"])) for r in rows}

    def configs(self) -> list[dict]:
        rows = self._db.execute("SELECT * FROM configs ORDER BY created_at, config_key").fetchall()
        return [{**dict(r), "description": json.loads(r["description"])} for r in rows]

    def runs(self, config_key: str | None = None) -> list[dict]:
        query = "SELECT * FROM runs" + (" WHERE config_key = ?" if config_key else "") + " ORDER BY run_id"
        rows = self._db.execute(query, (config_key,) if config_key else ()).fetchall()
        return [{**dict(r), "info": json.loads(r["info"])} for r in rows]

    def run_activity(self) -> dict[int, tuple[float, int]]:
        """Per run: when it stored its last search, and how many it stored."""
        rows = self._db.execute("SELECT run_id, MAX(created_at), COUNT(*) FROM searches GROUP BY run_id")
        return {int(r[0]): (float(r[1]), int(r[2])) for r in rows}

    def results(self, config_key: str | None = None) -> list[dict]:
        query = "SELECT * FROM results" + (" WHERE config_key = ?" if config_key else "")
        query += " ORDER BY config_key, algorithm, variant, budget, problem_id, seed"
        return [dict(r) for r in self._db.execute(query, (config_key,) if config_key else ())]

    def searches(self, config_key: str | None = None) -> list[dict]:
        """Every stored search's cell and id, without its result (read one
        with ``search``)."""
        query = "SELECT search_id, config_key, problem_id, algorithm, variant, budget, seed FROM searches"
        query += (" WHERE config_key = ?" if config_key else "") + " ORDER BY search_id"
        return [dict(r) for r in self._db.execute(query, (config_key,) if config_key else ())]

    def search(self, search_id: int) -> dict:
        row = self._db.execute("SELECT result FROM searches WHERE search_id = ?", (search_id,)).fetchone()
        if row is None:
            raise KeyError(f"no search with id {search_id}")
        return json.loads(row["result"])

    def count(self, table: str) -> int:
        if table not in ("configs", "runs", "searches", "results", "failures"):
            raise ValueError(f"unknown table {table!r}")
        return int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.
    IMMEDIATE takes the write lock at the start, so two writers never both
    read, then fail to upgrade their locks (a deadlock SQLite reports as busy)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: object) -> object:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")
