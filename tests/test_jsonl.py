"""Resumable JSON-lines files: a torn last line is cut off the file, a bad
complete line is an error naming the line, appends are whole lines."""

from __future__ import annotations

import pytest

from piscale.jsonl import JSONLinesError, append_lines, read_lines


def test_a_torn_last_line_is_cut_and_the_complete_ones_are_read(tmp_path):
    path = tmp_path / "records.jsonl"
    append_lines(path, [{"id": 1}, {"id": "два"}])
    with path.open("a") as handle:
        handle.write('{"id": 3, "te')  # killed mid-write
    assert list(read_lines(path)) == [(1, {"id": 1}), (2, {"id": "два"})]
    assert path.read_text(encoding="utf-8") == '{"id": 1}\n{"id": "два"}\n'  # the torn line is gone from the file
    append_lines(path, [{"id": 3}])
    append_lines(path, [])
    assert [record["id"] for _, record in read_lines(path)] == [1, "два", 3]
    assert list(read_lines(tmp_path / "missing.jsonl")) == []


def test_a_complete_line_that_is_not_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(JSONLinesError, match=r"records\.jsonl:2: not valid JSON"):
        list(read_lines(path))
