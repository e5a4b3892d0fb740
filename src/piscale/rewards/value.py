"""A learned step value: a small head on a backbone's hidden states.

**What it estimates.** For a problem c and a partial answer x_{<=t} the value
of the policy pi is

    V(c, x_{<=t}) = P(x correct | c, x_{<=t}),   x_{>t} ~ pi(. | c, x_{<=t}),

the chance that the policy, continuing from here, ends with a correct answer.
In twisted sequential Monte Carlo (Zhao et al. 2024) V is the optimal twist:
weighting particle x_{<=t} by V(c, x_{<=t}) makes the intermediate targets
the exact marginals of p(x | c, correct), so resampling at step t already
keeps the prefixes that lead to correct answers. Math-Shepherd (Wang et al.
2024) trains a process reward model on Monte-Carlo estimates of the same
quantity. Here V is fitted from the policy's own graded rollouts
(``piscale.values``): every prefix of a rollout is labelled with the
rollout's outcome (or with the fraction of k completions that are correct),
and the head minimises cross-entropy, whose minimiser is the conditional
expectation of the label given the features, i.e. V as far as the features
can tell.

**The model.** A transformers backbone reads the prompt and the steps; the
hidden state h_t of one layer at the end of step t is standardised with the
training set's mean and scale, and a head maps it to a logit:

    logistic:  V_t = sigmoid(w . z_t + b),          z_t = (h_t - mu) / sigma
    mlp:       V_t = sigmoid(w_2 . relu(W_1 z_t + b_1) + b_2)

**Token layout.** The backbone reads the chat prompt (its own chat template,
with the policy's system prompt), then the answer cut into *parts* at the
step delimiter, a blank line: each part stripped, its tokens, then the tokens
of "\\n\\n" (the *marker*). V_t is read at the marker that ends step t's last
part. A search scoring with ``model`` aggregation sends the whole partial
answer as one step (its steps joined by a blank line) and one scoring with
per-step aggregation sends the steps: both are cut into the same parts and
give the same tokens, so a score never depends on how the steps were sent,
and a partial answer's tokens are a prefix of its extension's.

**Incremental scoring.** ``TransformersPRM`` keeps the key/value caches of
the sequences it has read; because parts are tokenised separately, the
sequence of a particle's parent is an exact token prefix of the particle's,
so extending a particle by a step reads only that step's tokens.

**Features for training are served by the same code.** ``read_features``
lays trajectories out with ``layout`` and runs ``hidden_states_at``, the
function ``_forward`` uses when scoring; only the cache differs (training
reads each rollout whole, once), and a causal model's outputs do not depend
on it.

A head file (safetensors) holds the head's tensors and, as JSON metadata, the
backbone's spec and identity, the layer, the layout, the normalisation, how
the head was trained (command, data hashes, seed) and its held-out metrics.
``load_value_reward(path)`` rebuilds the reward from it, its backbone cut
above the layer the head reads (``keep_blocks_below``: the blocks above
are never needed); ``value`` alone names the head shipped for the catalog's
default math policy.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from piscale.rewards.aggregate import STEP_JOINER
from piscale.rewards.prm import TransformersPRM

log = logging.getLogger(__name__)

HEAD_FORMAT = "piscale.value_head/1"
METADATA_KEY = "piscale.value_head"
HEAD_KINDS = ("logistic", "mlp")


class HeadFileError(ValueError):
    """A head file that cannot be used; the message says why."""


# -- the head -------------------------------------------------------------------
@dataclass
class ValueHead:
    """Standardisation, then a logistic or one-hidden-layer MLP head."""

    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    """logistic: [w (H,)], mlp: [W_1 (M, H), W_2 (M,)]."""
    biases: list[np.ndarray]
    """logistic: [b ()], mlp: [b_1 (M,), b_2 ()]."""
    kind: str = "logistic"

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise HeadFileError(f"unknown head kind {self.kind!r}; expected one of {', '.join(HEAD_KINDS)}")
        expected = 1 if self.kind == "logistic" else 2
        if len(self.weights) != expected or len(self.biases) != expected:
            raise HeadFileError(f"a {self.kind} head has {expected} weight(s) and bias(es)")
        if self.mean.shape != self.scale.shape or self.mean.ndim != 1:
            raise HeadFileError("mean and scale must be vectors of the feature size")
        if np.any(self.scale <= 0):
            raise HeadFileError("feature scales must be positive")
        first = self.weights[0]
        if first.shape[-1] != self.mean.shape[0]:
            raise HeadFileError(f"the head reads {first.shape[-1]} features but the normalisation has {self.mean.shape[0]}")

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., H] hidden states -> [...] logits of V."""
        if features.shape[-1] != self.features:
            raise ValueError(f"the head reads {self.features} features, got hidden states of size {features.shape[-1]}")
        as_tensor = lambda a: torch.as_tensor(a, dtype=features.dtype, device=features.device)  # noqa: E731
        z = (features - as_tensor(self.mean)) / as_tensor(self.scale)
        if self.kind == "logistic":
            return z @ as_tensor(self.weights[0]) + as_tensor(self.biases[0])
        hidden = torch.relu(z @ as_tensor(self.weights[0]).T + as_tensor(self.biases[0]))
        return hidden @ as_tensor(self.weights[1]) + as_tensor(self.biases[1])

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """V for rows of features (numpy in, numpy out)."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(torch.as_tensor(features, dtype=torch.float32))).numpy()

    def tensors(self) -> dict[str, np.ndarray]:
        named = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            named[f"layer{i}.weight"], named[f"layer{i}.bias"] = w, np.asarray(b)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in named.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], kind: str) -> ValueHead:
        count = 1 if kind == "logistic" else 2
        try:
            return cls(
                mean=tensors["mean"],
                scale=tensors["scale"],
                weights=[tensors[f"layer{i}.weight"] for i in range(count)],
                biases=[tensors[f"layer{i}.bias"] for i in range(count)],
                kind=kind,
            )
        except KeyError as error:
            raise HeadFileError(f"the head file lacks the tensor {error.args[0]!r} of a {kind} head") from error


# -- the head file ----------------------------------------------------------------
@dataclass
class HeadFile:
    head: ValueHead
    metadata: dict = field(default_factory=dict)
    """backbone, backbone_identity, layer, layout, head, training, metrics."""

    def save(self, path: str | Path) -> str:
        """Write the file; return its sha256."""
        from safetensors.numpy import save_file

        for key in ("backbone", "layer", "layout"):
            if key not in self.metadata:
                raise HeadFileError(f"head metadata needs {key!r}")
        metadata = {**self.metadata, "format": HEAD_FORMAT, "head": {**self.metadata.get("head", {}), "kind": self.head.kind}}
        save_file(self.head.tensors(), str(path), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        return file_sha256(path)

    @classmethod
    def read(cls, path: str | Path) -> HeadFile:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HeadFileError(f"no value head file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own types for bad headers
            raise HeadFileError(f"{path} is not a safetensors file: {error}") from error
        if raw is None:
            raise HeadFileError(f"{path} has no {METADATA_KEY!r} metadata: it is not a piscale value head")
        metadata = json.loads(raw)
        if metadata.get("format") != HEAD_FORMAT:
            raise HeadFileError(f"{path} is in format {metadata.get('format')!r}; this piscale reads {HEAD_FORMAT}")
        kind = metadata.get("head", {}).get("kind", "logistic")
        return cls(ValueHead.from_tensors(tensors, kind), metadata)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- features -------------------------------------------------------------------
def hidden_states_at(model, layers: Sequence[int], keep: torch.Tensor, **inputs) -> torch.Tensor:
    """Hidden states of ``layers`` (indices into the model's
    ``hidden_states``: 0 the embeddings, -1 the last) at the positions
    ``keep`` of the tokens read: [len(layers), B, K, H]. ``inputs`` go to the
    model's forward (ids, mask, positions, cache)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1  # the language-model head is not needed
    output = model(**inputs, output_hidden_states=True)
    states = output.hidden_states
    if states is None:
        raise RuntimeError(f"{type(model).__name__} returned no hidden states")
    return torch.stack([states[layer][:, keep] for layer in layers])


def keep_blocks_below(model, layer: int) -> int:
    """Cut a backbone after the decoder block whose output is
    ``hidden_states[layer]``, for a reward that reads that layer alone: the
    blocks above it and the final norm are never needed, and dropping them
    saves their compute, weights and cache. Returns the layer's index in the
    cut model, where it is the last hidden state. A layer out of range, the
    last one, the embeddings, or a decoder not laid out as ``layers`` and
    ``norm`` leaves the model whole."""
    blocks = model.config.num_hidden_layers
    if not -blocks - 1 <= layer <= blocks:
        return layer  # StepValueReward says what is wrong with it
    index = layer % (blocks + 1)  # hidden_states: the embeddings, then one per block
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not 1 <= index < blocks or not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
        return index
    decoder.layers = decoder.layers[:index]
    # The last hidden state comes out of the final norm; once block ``index``
    # is the last, the norm would change the state the head was fitted on.
    decoder.norm = torch.nn.Identity()
    model.config.num_hidden_layers = index
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:index]
    return index


def split_parts(steps: Sequence[str], delimiter: str = STEP_JOINER) -> list[list[str]]:
    """Each step's stripped text cut at the delimiter into stripped parts
    (see the module doc: the same parts whether steps come joined or not)."""
    return [[part.strip() for part in step.strip().split(delimiter)] for step in steps]


class StepValueReward(TransformersPRM):
    """V(c, x_{<=t}) from a head on a backbone's hidden state at the end of
    each step; incremental over the backbone's key/value cache."""

    scale = "probability"

    def __init__(
        self,
        model,
        tokenizer,
        head: ValueHead,
        *,
        layer: int = -1,
        system_prompt: str | None = None,
        prompt_format: str | None = None,
        cache_tokens: int = 32768,
        batch_tokens: int = 8192,
        name: str = "value",
    ):
        layers = model.config.num_hidden_layers
        if not -layers - 1 <= layer <= layers:
            raise ValueError(f"layer {layer} is outside the backbone's hidden states 0..{layers} (or -1..-{layers + 1})")
        hidden = model.config.hidden_size
        if head.features != hidden:
            raise ValueError(f"the head reads {head.features} features but the backbone's hidden size is {hidden}")
        super().__init__(
            model,
            tokenizer,
            marker=STEP_JOINER,
            step_joiner="",
            system_prompt=system_prompt,
            prompt_format=prompt_format,
            cache_tokens=cache_tokens,
            batch_tokens=batch_tokens,
            name=name,
        )
        self.head = head
        self.layer = layer

    # -- layout ----------------------------------------------------------------
    def layout(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """Prompt, then every part and its marker; one position per step: the
        marker ending its last part."""
        tokens, part_markers, step_ends = self.part_layout(prompt, steps)
        return tokens, [part_markers[end] for end in step_ends]

    def part_layout(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
        """Tokens, the marker position of every part, and for each step the
        index of its last part."""
        tokens = list(self.prompt_ids(prompt))
        markers, ends = [], []
        for parts in split_parts(steps):
            for part in parts:
                tokens += self._encode(part) + self.marker_ids
                markers.append(len(tokens) - 1)
            ends.append(len(markers) - 1)
        return tokens, markers, ends

    # -- reading V -------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, keep):
        """The hidden states of ``self.layer`` at ``keep``: [B, K, H]."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if cache is not None:
            inputs.update({getattr(self, "_cache_argument", None) or "past_key_values": cache, "use_cache": True})
        return hidden_states_at(self.model, (self.layer,), keep, **inputs)[0]

    def _probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head.logits(features))

    @torch.inference_mode()
    def read_features(
        self, prompts: Sequence[str], trajectories: Sequence[Sequence[str]], layers: Sequence[int] | None = None
    ) -> list[np.ndarray]:
        """Hidden states at the end of every step of each trajectory, each
        read whole (no cache): one [len(layers), steps, H] float32 array per
        trajectory. The training features of ``piscale.values.train``."""
        if len(prompts) != len(trajectories):
            raise ValueError(f"got {len(prompts)} prompts but {len(trajectories)} trajectories; they must pair up")
        layers = tuple(layers) if layers is not None else (self.layer,)
        laid = [self.layout(prompt, steps) for prompt, steps in zip(prompts, trajectories)]
        found: list[np.ndarray | None] = [None] * len(laid)
        order = sorted(range(len(laid)), key=lambda i: len(laid[i][0]), reverse=True)
        while order:
            width = len(laid[order[0]][0])
            rows = max(1, self.batch_tokens // width)
            batch, order = order[:rows], order[rows:]
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                tokens = laid[i][0]
                input_ids[r, : len(tokens)] = torch.tensor(tokens)
                attention[r, : len(tokens)] = 1
            positions = torch.arange(width).expand(len(batch), width)
            wanted = sorted({p for i in batch for p in laid[i][1]})
            column = {p: k for k, p in enumerate(wanted)}
            keep = torch.tensor(wanted, dtype=torch.long, device=self.device)
            states = self._features_of_batch(input_ids, attention, positions, keep, layers)
            for r, i in enumerate(batch):
                columns = [column[p] for p in laid[i][1]]
                found[i] = states[:, r, columns].float().cpu().numpy()
            self.usage.scored_tokens += int(attention.sum())
        return [f for f in found if f is not None]

    def _features_of_batch(self, input_ids, attention, positions, keep, layers) -> torch.Tensor:
        device = self.device
        return hidden_states_at(
            self.model,
            layers,
            keep,
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
        )


# -- loading ---------------------------------------------------------------------
HEADS_PACKAGE = "piscale.rewards.heads"
DEFAULT_HEAD = "default"


def shipped_heads() -> dict:
    """The manifest of heads shipped in the package: name -> file, sha256,
    and how it was made."""
    text = resources.files(HEADS_PACKAGE).joinpath("manifest.json").read_text()
    return json.loads(text)


def shipped_head_path(name: str = DEFAULT_HEAD) -> Path:
    """The file of a shipped head, checked against its recorded sha256."""
    manifest = shipped_heads()
    if name not in manifest:
        raise HeadFileError(f"no shipped value head named {name!r}; shipped: {', '.join(manifest) or 'none'}")
    entry = manifest[name]
    path = Path(str(resources.files(HEADS_PACKAGE).joinpath(entry["file"])))
    if not path.is_file():
        raise HeadFileError(f"the shipped value head {name!r} is missing its file {entry['file']}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise HeadFileError(f"{path} has sha256 {digest}, the manifest records {entry['sha256']}: the file is damaged")
    return path


def load_value_reward(
    path: str | Path | None = None, *, device: str = "cpu", dtype: str | None = None, **options
) -> StepValueReward:
    """The reward of a head file (the shipped default head when ``path`` is
    None), its backbone loaded with ``piscale.models.load_transformers``
    from the spec in the file's metadata, in the dtype its features were
    read in (unless ``dtype`` says otherwise). A head read in bfloat16 is
    served in float32 on a device that only emulates bfloat16 (CPUs
    without AVX512-BF16 or AMX): 6 to 8 times faster there, with scores
    within about 0.01 of bfloat16's (a logged warning says so)."""
    from piscale.models import load_transformers, serving_dtype

    path = shipped_head_path() if path is None else Path(path)
    head_file = HeadFile.read(path)
    meta = head_file.metadata
    layout = meta["layout"]
    if layout.get("kind") != "parts":
        raise HeadFileError(f"{path}: unknown layout {layout.get('kind')!r}; this piscale reads the 'parts' layout")
    if dtype is None:
        dtype = serving_dtype(device, meta.get("dtype", "float32"))
        if dtype != meta.get("dtype", "float32"):
            log.warning("%s was read in bfloat16, which this %s only emulates; serving it in float32 (6-8x "
                        "faster, scores within about 0.01; pass dtype='bfloat16' to keep it)", path.name, device)
    model, tokenizer = load_transformers(meta["backbone"], device=device, dtype=dtype)
    layer = keep_blocks_below(model, int(meta["layer"]))
    return StepValueReward(
        model,
        tokenizer,
        head_file.head,
        layer=layer,
        system_prompt=layout.get("system_prompt"),
        prompt_format=layout.get("prompt_format"),
        name=f"value:{path.name}",
        **options,
    )
