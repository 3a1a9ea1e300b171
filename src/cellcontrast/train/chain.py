"""The four steps in one call, and the chain they assemble:
preprocess -> encoder -> (component) -> head."""

from __future__ import annotations

import numpy as np
from torch import nn

from cellcontrast.nn.bases import BaseModel
from cellcontrast.nn.chain import ChainModule
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.component import fit_component
from cellcontrast.train.loops import Log


def build_chain(base_model: BaseModel, component: nn.Module | None = None,
                head: nn.Module | None = None) -> ChainModule:
    """preprocess -> encoder -> component -> head; without a component, the base's own head."""
    if component is not None and head is None:
        raise ValueError("a chain with a component needs the head trained on its output")
    chain = ChainModule(base_model.preprocess, base_model.encoder, component,
                  head if head is not None else base_model.head)
    chain.eval()
    return chain


def fit_chain(train_counts, train_y: np.ndarray, val_counts, val_y: np.ndarray, n_classes: int,
              base: str, component: str = "none", params: dict | None = None, seed: int = 0,
              log: Log | None = None) -> ChainModule:
    """Steps 1-4 in one call. ``params`` is keyed by model name like ``DEFAULT_PARAMS``."""
    params = params or {}
    model = fit_base(train_counts, train_y, val_counts, val_y, n_classes, base,
                     params.get(base), seed, log, for_component=component not in (None, "none"))
    if component in (None, "none"):
        return build_chain(model)
    h, head = fit_component(model, train_counts, train_y, val_counts, val_y, n_classes,
                            component, params.get(component), seed, log)
    return build_chain(model, h, head)
