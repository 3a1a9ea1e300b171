"""A whole annotator as one module: preprocess -> encoder -> component -> head -> softmax.

The chain is what gets saved, loaded and exported to ONNX: raw counts ``float32 [B, G]`` in,
probabilities ``[B, C]`` out, with no data-dependent Python control flow and no sparse ops.

On disk a chain is a directory with ``chain.pt`` (a plain state_dict, loaded with
``weights_only=True``) and ``config.json``: every submodule's class name and constructor
arguments (``modules``), plus ``base``, ``component``, ``n_genes``, ``n_classes``, ``genes``,
``class_names``, ``preprocessing`` (a human-readable description) and whatever else the
caller put in (run id, metrics, ...).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.files import atomic_path
from cellcontrast.nn import bases as _models
from cellcontrast.nn import components as _components
from cellcontrast.nn import preprocessing as _preprocessing
from cellcontrast.nn.novelty import UnexplainedExpression

CHAIN_WEIGHTS = "chain.pt"
CHAIN_CONFIG = "config.json"

# Every class a saved chain may contain, by name; load_chain only builds these.
_BUILDABLE: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        _preprocessing.LRPreprocess, _preprocessing.ActinnPreprocess, _preprocessing.ScdaePreprocess,
        _models.IdentityEncoder, _models.ActinnEncoder, _models.DenoisingEncoder,
        _models.LinearHead, _models.ScdaeHead,
        _components.MLPComponent, _components.MLSComponent, UnexplainedExpression,
    )
}


class ChainModule(nn.Module):
    """``softmax(f(h(g(preprocess(counts)))))``; ``h`` is the identity for a base model alone."""

    def __init__(self, preprocess: nn.Module, encoder: nn.Module, component: nn.Module | None,
                 head: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.has_component = component is not None
        self.component = component if component is not None else nn.Identity()
        self.head = head
        # Temperature scaling of the logits, fitted on validation (calibration.py); 1 = none.
        self.register_buffer("temperature", torch.ones(()))
        # The ``expression`` novelty score (nn/novelty.py), fitted on training cells; optional.
        self.novelty: UnexplainedExpression | None = None

    def unexplained_expression(self, counts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The ``expression`` novelty of each cell given the head's logits (its predicted class)."""
        return self.novelty(counts, logits.argmax(dim=-1))

    def embed(self, counts: torch.Tensor) -> torch.Tensor:
        """The embedding fed to the head: h(g(x)), or g(x) without a component."""
        return self.component(self.encoder(self.preprocess(counts)))

    def logits(self, counts: torch.Tensor) -> torch.Tensor:
        """The head's logits, before temperature scaling."""
        return self.head(self.embed(counts))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities from an embedding: ``softmax(f(embedding) / T)``."""
        return torch.softmax(self.head(embedding) / self.temperature, dim=-1)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(counts))

    @property
    def n_genes(self) -> int:
        return self.preprocess.n_genes

    @property
    def n_classes(self) -> int:
        return self.head.n_classes


def module_spec(module: nn.Module) -> dict:
    name = type(module).__name__
    if name not in _BUILDABLE:
        raise TypeError(f"{name} cannot be saved in a chain (not one of {sorted(_BUILDABLE)})")
    return {"class": name, "kwargs": module.get_config()}


def build_module(spec: dict) -> nn.Module:
    try:
        cls = _BUILDABLE[spec["class"]]
    except KeyError:
        raise ValueError(f"unknown module class in chain config: {spec.get('class')!r}") from None
    return cls(**spec["kwargs"])


def chain_config(chain: ChainModule, config: dict | None = None) -> dict:
    """The caller's config completed with what is needed to rebuild ``chain``."""
    out = dict(config or {})
    out["modules"] = {
        "preprocess": module_spec(chain.preprocess),
        "encoder": module_spec(chain.encoder),
        "component": module_spec(chain.component) if chain.has_component else None,
        "head": module_spec(chain.head),
    }
    if chain.novelty is not None:
        out["modules"]["novelty"] = module_spec(chain.novelty)
    out["n_genes"] = chain.n_genes
    out["n_classes"] = chain.n_classes
    out.setdefault("base", _base_name(chain.preprocess))
    out.setdefault("component", _component_name(chain))
    out.setdefault("preprocessing", chain.preprocess.describe())
    for key, expected in (("genes", chain.n_genes), ("class_names", chain.n_classes)):
        if key in out:
            out[key] = [str(v) for v in out[key]]
            if len(out[key]) != expected:
                raise ValueError(f"config[{key!r}] has {len(out[key])} entries, the chain expects {expected}")
    return out


def save_chain(chain: ChainModule, config: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``chain.pt`` (state_dict) and ``config.json`` into ``out_dir``; returns the dir."""
    full_config = chain_config(chain, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in chain.state_dict().items()}
    with atomic_path(out_dir / CHAIN_WEIGHTS) as tmp:
        torch.save(state, tmp)
    with atomic_path(out_dir / CHAIN_CONFIG) as tmp:
        tmp.write_text(json.dumps(full_config, indent=2, default=_json_default))
    return out_dir


def load_chain(model_dir: str | os.PathLike) -> tuple[ChainModule, dict]:
    """Rebuild a chain from ``config.json`` and load ``chain.pt`` (weights only, never pickle)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / CHAIN_CONFIG).read_text())
    specs = config["modules"]
    chain = ChainModule(
        build_module(specs["preprocess"]),
        build_module(specs["encoder"]),
        build_module(specs["component"]) if specs.get("component") else None,
        build_module(specs["head"]),
    )
    if specs.get("novelty"):  # chains saved before it existed have none
        chain.novelty = build_module(specs["novelty"])
    try:
        state = torch.load(model_dir / CHAIN_WEIGHTS, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code: no.
        raise InputError(f"cannot load the chain in {model_dir}: {CHAIN_WEIGHTS} is not a file of plain tensors "
                         "(damaged, or a pickle that could run code, which is never loaded); "
                         "save the chain with `cellcontrast train`") from None
    state.setdefault("temperature", torch.ones(()))  # chains saved before calibration existed
    chain.load_state_dict(state)
    chain.eval()
    return chain, config


def find_chain_folder(model_dir: str | os.PathLike) -> Path:
    """The folder holding ``chain.pt`` and ``config.json``: ``model_dir`` itself, or the one
    chain folder inside it (``cellcontrast train --out-dir m`` saves ``m/<base>-<component>/``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} is not a folder; pass the folder holding chain.pt and config.json")
    if (model_dir / CHAIN_CONFIG).exists() or (model_dir / CHAIN_WEIGHTS).exists():
        missing = [name for name in (CHAIN_WEIGHTS, CHAIN_CONFIG) if not (model_dir / name).exists()]
        if missing:
            raise InputError(f"{model_dir} has no {' or '.join(missing)}; pass a folder saved by `cellcontrast train`")
        return model_dir
    inside = sorted(p.parent for p in model_dir.glob(f"*/{CHAIN_CONFIG}") if (p.parent / CHAIN_WEIGHTS).exists())
    if len(inside) == 1:
        return inside[0]
    if inside:
        names = ", ".join(str(p) for p in inside)
        raise InputError(f"{model_dir} holds {len(inside)} chains ({names}); pass one of them")
    raise InputError(f"{model_dir} has no chain.pt or config.json; pass a folder saved by `cellcontrast train`")


def load_chain_folder(model_dir: str | os.PathLike) -> tuple[ChainModule, dict]:
    """`load_chain` of `find_chain_folder(model_dir)`, every failure an InputError."""
    folder = find_chain_folder(model_dir)
    try:
        return load_chain(folder)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot load the chain in {folder}: {first_line(err)}") from err


@torch.no_grad()
def predict_logits(chain: ChainModule, counts, batch_size: int = 4096) -> np.ndarray:
    """The head's logits ``[n_cells, C]`` (before temperature scaling), in batches."""
    return predict_proba(chain, counts, batch_size, output=chain.logits)


@torch.no_grad()
def predict_proba(chain: nn.Module, counts, batch_size: int = 4096, output=None) -> np.ndarray:
    """Class probabilities ``[n_cells, C]`` for a (sparse or dense) count matrix, in batches.

    `output` replaces the chain's forward (for example ``chain.logits``).
    """
    output = output or chain
    was_training = chain.training
    chain.eval()
    try:
        n = counts.shape[0]
        parts = []
        for start in range(0, n, batch_size):
            block = counts[start:start + batch_size]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            parts.append(output(torch.as_tensor(block, dtype=torch.float32)).numpy())
        if not parts:
            return np.zeros((0, chain.n_classes), dtype=np.float32)
        return np.concatenate(parts, axis=0)
    finally:
        chain.train(was_training)


def _base_name(preprocess: nn.Module) -> str:
    for name, cls in _preprocessing.PREPROCESSORS.items():
        if isinstance(preprocess, cls):
            return name
    return type(preprocess).__name__


def _component_name(chain: ChainModule) -> str:
    if not chain.has_component:
        return "none"
    for name, cls in _components.COMPONENTS.items():
        if isinstance(chain.component, cls):
            return name
    return type(chain.component).__name__


def _json_default(value):
    """numpy scalars/arrays from metrics dicts into JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
