"""Append-only JSON-lines files that a killed run can resume.

A run appends finished records and syncs them to disk, so a kill loses at
most the records in flight. A kill in the middle of a write leaves a last
line without its newline: ``read_lines`` cuts it off (its work is redone)
before parsing what is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


class JSONLinesError(ValueError):
    """A line of a records file is not JSON."""


def read_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every complete line of ``path``,
    after cutting a torn last line off the file; nothing for a missing file."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise JSONLinesError(f"{path}:{number}: not valid JSON ({error})") from None


def append_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append ``records``, one JSON object a line, and sync them to disk."""
    if not records:
        return
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())
