"""What identifies an evaluation's configuration: the models it names (by
content hash where the catalog knows them), the reward with every model and
head file it reads, and the package versions recorded beside each run.

A configuration's key is the hash of ``keyed_description``: the parts of its
description that decide a result, so that a changed model file starts a new
configuration while the same files found elsewhere resume the stored one.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import metadata

PACKAGES = ("piscale", "torch", "transformers", "numpy", "math-verify", "llama-cpp-python", "openai", "gguf")


def model_identity(spec: str) -> dict:
    """What identifies a model: the catalog's identity (file hashes) when it
    knows the spec, else the spec itself with the reason none was found."""
    try:
        from piscale import models

        identity = models.resolve(spec, download=False).identity
    except Exception as error:  # unknown specs (toy, hub ids, servers) are normal here
        return {"spec": spec, "identity_unavailable": f"{type(error).__name__}: {error}"}
    if isinstance(identity, Mapping):
        return {"spec": spec, **identity}
    return {"spec": spec, "identity": str(identity)}


REWARD_KINDS_WITH_MODELS = ("judge", "prm", "cdr")


def reward_identity(spec: str, policy_spec: str) -> dict:
    """The reward spec with the identity of every model it names (a judge,
    a PRM, the two models of a density ratio), so a changed reward model
    file changes the configuration. ``judge`` alone judges with the policy.
    A product (``value*arith``) holds the models of all its terms."""
    from piscale.rewards.spec import kind_and_argument, product_terms, split_exponent

    terms = product_terms(spec)
    if len(terms) > 1:
        return {"spec": spec, "models": [m for term in terms for m in reward_identity(term, policy_spec).get("models", [])]}
    kind, argument = kind_and_argument(split_exponent(spec)[0])
    if kind == "value":
        return {"spec": spec, "models": value_head_identity(argument or None)}
    if kind not in REWARD_KINDS_WITH_MODELS:
        return {"spec": spec}
    names = [policy_spec] if kind == "judge" and not argument else [m.strip() for m in argument.split(",") if m.strip()]
    return {"spec": spec, "models": [model_identity(name) for name in names]}


def value_head_identity(path: str | None) -> list[dict]:
    """A learned value's head file (the shipped one when ``path`` is None) by
    its sha256, and its backbone's identity: retraining the head, or
    changing the backbone it reads, changes the configuration."""
    from pathlib import Path

    from piscale.models import file_sha256
    from piscale.rewards.value import HeadFile, shipped_head_path

    try:
        head = shipped_head_path() if path is None else Path(path)
        identities = [{"spec": path or "value", "identity": f"sha256:{file_sha256(head)}"}]
    except (OSError, ValueError) as error:
        return [{"spec": path or "value", "identity_unavailable": f"{type(error).__name__}: {error}"}]
    try:
        identities.append(model_identity(HeadFile.read(head).metadata["backbone"]))
    except (OSError, ValueError, KeyError) as error:
        identities.append({"spec": "backbone", "identity_unavailable": f"{type(error).__name__}: {error}"})
    return identities


def key_identity(identity: Mapping) -> dict:
    """What of a model's identity decides a key: its content hash where there
    is one, not the spec it was found by (the same file elsewhere, as a
    package's head file in another checkout, resumes its results); else the
    spec, without the reason the hash was unavailable: that wording is for
    people and may change between versions while the model stays the same."""
    if "identity" in identity:
        return {k: v for k, v in identity.items() if k != "spec"}
    return {k: v for k, v in identity.items() if k != "identity_unavailable"}


def keyed_description(description: Mapping) -> dict:
    """What of a configuration's description decides its key: of the data,
    only its fingerprint (not what it was called or where it was read from:
    the same problems moved elsewhere resume their results); everything else
    but the wording of unavailable identities."""
    reward = description["reward"]
    return {
        **description,
        "dataset": {"fingerprint": description["dataset"]["fingerprint"]},
        "model": key_identity(description["model"]),
        "reward": {**reward, "models": [key_identity(m) for m in reward.get("models", [])]},
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
