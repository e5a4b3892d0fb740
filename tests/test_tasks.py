"""Task loading: the four data shapes, lookup by name, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piscale.tasks import (
    BUILTIN_FILES,
    TaskError,
    data_dirs,
    format_prompt,
    load_task,
    normalize_number,
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(
        folder / "math500.jsonl",
        [
            {"problem": "Compute $1/2+1/4$.", "solution": "... $\\boxed{\\frac34}$", "answer": "\\frac{3}{4}",
             "unique_id": "test/algebra/1.json"},
            {"problem": "What is $2^3$?", "solution": "$\\boxed{8}$", "answer": "8", "unique_id": "test/algebra/2.json"},
        ],
    )
    write_jsonl(
        folder / "gsm8k_test.jsonl",
        [
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A car costs 1000 and a bike 234. Total?", "answer": "1000+234=1234\n#### 1,234"},
        ],
    )
    write_jsonl(folder / "amc23.jsonl", [{"id": 0, "problem": "Meet where?", "answer": 27.0},
                                         {"id": 1, "problem": "Half of one?", "answer": 0.5}])
    write_jsonl(folder / "aime24.jsonl", [{"id": 60, "problem": "Minutes?", "answer": "204"}])
    return folder


def test_builtin_names_read_each_shape(data_dir: Path) -> None:
    math = load_task("math500", data_dir)
    assert [(p.id, p.reference) for p in math.problems] == [
        ("test/algebra/1.json", "\\frac{3}{4}"),
        ("test/algebra/2.json", "8"),
    ]
    gsm = load_task("gsm8k", data_dir)
    assert [(p.id, p.reference) for p in gsm.problems] == [("gsm8k-0", "7"), ("gsm8k-1", "1234")]
    assert gsm.problems[0].question.startswith("Tom has 3 apples")
    amc = load_task("amc23", data_dir)
    assert [(p.id, p.reference) for p in amc.problems] == [("0", "27"), ("1", "0.5")]
    aime = load_task("aime24", data_dir)
    assert [(p.id, p.question, p.reference) for p in aime.problems] == [("60", "Minutes?", "204")]


def test_data_dir_comes_from_the_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PISCALE_DATA", str(data_dir))
    assert data_dirs()[0] == data_dir
    assert load_task("aime24").source == str(data_dir / "aime24.jsonl")


def test_missing_builtin_file_names_the_places_searched(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"gsm8k_test\.jsonl does not exist"):
        load_task("gsm8k", tmp_path)


def test_any_file_of_the_same_shape(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"question": "q1", "answer": "#### 5"},
        {"problem": "q2", "solution": "so \\boxed{\\sqrt{2}} and done"},
        {"problem": "q3", "answer": 12},
    ])
    task = load_task(str(path))
    assert [(p.id, p.reference) for p in task.problems] == [("mine-0", "5"), ("mine-1", "\\sqrt{2}"), ("mine-2", "12")]
    array = tmp_path / "mine.json"
    array.write_text(json.dumps([{"question": "q", "answer": "1"}]))
    assert load_task(str(array)).problems[0].reference == "1"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"answer": "3"}, "no question"),
        ({"question": "q"}, "no reference answer"),
        ({"question": "q", "solution": "no box here"}, "no reference answer"),
        ({"question": "q", "answer": True}, "boolean"),
        ({"question": "q", "answer": float("nan")}, "not a finite number"),
        (["not", "an", "object"], "expected a JSON object"),
    ],
)
def test_bad_records_say_what_and_where(tmp_path: Path, record: object, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "fine", "answer": "1"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TaskError, match=message) as caught:
        load_task(str(path))
    assert "bad.jsonl:2" in str(caught.value)


def test_duplicate_ids_and_broken_json_are_errors(tmp_path: Path) -> None:
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "a", "answer": "1"},
                                               {"id": 1, "question": "b", "answer": "2"}])
    with pytest.raises(TaskError, match=r"dup.jsonl:2: id '1' already used at .*dup.jsonl:1$"):
        load_task(str(dup))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": "1"}\n{"question": \n')
    with pytest.raises(TaskError, match="broken.jsonl:2: not valid JSON"):
        load_task(str(broken))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskError, match="no problems"):
        load_task(str(empty))


def test_unknown_names_and_hub_ids() -> None:
    with pytest.raises(TaskError, match="unknown dataset 'no-such-task'"):
        load_task("no-such-task")
    with pytest.raises(TaskError, match="hf:NAME"):
        load_task("hf:")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(TaskError, match="needs the 'datasets' package"):
            load_task("hf:openai/gsm8k:main@test")


def test_fingerprint_follows_the_content(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "1"}])
    first = load_task(str(path)).fingerprint
    assert load_task(str(path)).fingerprint == first
    write_jsonl(path, [{"question": "q", "answer": "2"}])
    assert load_task(str(path)).fingerprint != first


def test_limit_takes_the_first_problems(data_dir: Path) -> None:
    task = load_task("gsm8k", data_dir)
    assert [p.id for p in task.head(1)] == ["gsm8k-0"]
    assert len(task.head(None)) == 2
    with pytest.raises(TaskError, match="limit must be >= 1"):
        task.head(0)


def test_skip_leaves_out_the_first_problems(data_dir: Path) -> None:
    task = load_task("gsm8k", data_dir)
    assert [p.id for p in task.head(None, skip=1)] == ["gsm8k-1"]
    assert [p.id for p in task.head(1, skip=1)] == ["gsm8k-1"]
    with pytest.raises(TaskError, match="leaves none of the 2 problems"):
        task.head(None, skip=2)
    with pytest.raises(TaskError, match="skip must be a whole number"):
        task.head(1, skip=-1)


def test_prompt_template_keeps_latex_braces() -> None:
    template = "Solve: {question}\nPut the answer in \\boxed{}."
    assert format_prompt(template, "1+1?") == "Solve: 1+1?\nPut the answer in \\boxed{}."
    with pytest.raises(TaskError, match=r"must contain \{question\}"):
        format_prompt("no placeholder", "1+1?")


def test_numbers_normalise_like_the_reference_files() -> None:
    assert normalize_number(27.0) == "27"
    assert normalize_number(3159.0) == "3159"
    assert normalize_number(0.25) == "0.25"
    assert normalize_number(-4) == "-4"


def test_builtin_tasks_come_from_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PISCALE_DATA", raising=False)
    sizes = {name: len(load_task(name).problems) for name in BUILTIN_FILES}
    assert sizes == {"math500": 500, "gsm8k": 1319, "gsm8k_train": 7473, "aime24": 30, "amc23": 40}
    gsm8k = load_task("gsm8k")
    assert gsm8k.source == "piscale.data:gsm8k"
    assert gsm8k.problems[0].reference == "18"
    assert load_task("amc23").problems[0].reference == "27"
    assert load_task("math500").problems[0].reference == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # The fingerprint the stored GSM8K runs (experiments/db/) recorded when
    # the same file was read from a folder: packaging must not change it.
    assert gsm8k.fingerprint == "65d6a2a1ff4543c18f983eab6833b837e80a0459f51b05cbf46bee561d12ba29"
    train_questions = {p.question for p in load_task("gsm8k_train").problems}
    assert not train_questions & {p.question for p in gsm8k.problems}


def test_packaged_data_is_checked_against_its_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from piscale import data

    assert data.names("task") == list(BUILTIN_FILES)
    assert data.names("corpus") == ["fairytales"]
    assert len(data.read_text("fairytales").splitlines()) == data.manifest()["fairytales"]["records"]
    with pytest.raises(data.DataError, match="no packaged data set 'gsm8k_dev'"):
        data.read_text("gsm8k_dev")

    class Tampered:
        def __init__(self, inner):
            self.inner = inner

        def joinpath(self, name):
            resource = self.inner.joinpath(name)
            if not name.endswith(".gz"):
                return resource
            text = gzip.decompress(resource.read_bytes()).replace(b"#### 18", b"#### 19", 1)
            return type("R", (), {"is_file": lambda _: True, "read_bytes": lambda _: gzip.compress(text)})()

    real_files = data.resources.files
    monkeypatch.setattr(data.resources, "files", lambda package: Tampered(real_files(package)))
    data.read_text.cache_clear()
    try:
        with pytest.raises(data.DataError, match="has sha256 .* the manifest says"):
            data.read_text("gsm8k")
    finally:
        monkeypatch.undo()
        data.read_text.cache_clear()


def test_hub_ids_go_through_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Two plus two?", "answer": "2 + 2 = 4\n#### 4"}, {"question": "One?", "answer": "#### 1"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task("hf:openai/gsm8k:main@test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.id, p.reference) for p in task.problems] == [("openai_gsm8k-0", "4"), ("openai_gsm8k-1", "1")]
    assert task.label == "hf:openai/gsm8k:main@test"
    load_task("hf:HuggingFaceH4/MATH-500")
    assert calls[-1] == ("HuggingFaceH4/MATH-500", None, "test")
