"""The three base models, each split into preprocess -> encoder g -> head f.

Every submodule has ``get_config()`` returning its constructor keyword arguments, so that
``chain.save_chain`` can write them to config.json and ``chain.load_chain`` can rebuild the
module before loading weights. Layer sizes are constructor parameters (defaults: the paper's
recipes), so tuning can change them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cellcontrast.nn.preprocessing import GeneSelecting

# ---------------------------------------------------------------- encoders


class IdentityEncoder(nn.Module):
    """Logistic regression's encoder: the preprocessing is the whole of g, so z = x."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.out_dim = int(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim}


class ActinnEncoder(nn.Module):
    """ACTINN's hidden layers: Linear + ReLU for each width (default 100 -> 50 -> 25)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int] = (100, 50, 25)):
        super().__init__()
        self.in_dim = int(in_dim)
        self.hidden_dims = [int(d) for d in hidden_dims]
        layers: list[nn.Module] = []
        width = self.in_dim
        for d in self.hidden_dims:
            layers += [nn.Linear(width, d), nn.ReLU()]
            width = d
        self.layers = nn.Sequential(*layers)
        self.out_dim = width
        _xavier(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "hidden_dims": self.hidden_dims}


def _dense_bn(in_dim: int, out_dim: int) -> nn.Sequential:
    """scDAE's ``fc_bn``: a dense layer (He init; no bias, as batch norm re-centres) + BN.

    BN momentum 0.1 matches the TensorFlow decay of 0.9.
    """
    linear = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.kaiming_normal_(linear.weight, nonlinearity="linear")
    return nn.Sequential(linear, nn.BatchNorm1d(out_dim, momentum=0.1))


class DenoisingEncoder(nn.Module):
    """scDAE encoder: Gaussian input noise, 1000 (ELU) -> 500 (tanh) -> 125 (linear code).

    Noise and dropout act in training mode only, so an exported (eval) graph is deterministic.
    ``dropout`` is a plain attribute-backed module so training phases can switch it (the
    original keeps everything in the autoencoder phase and drops 70% in the classifier and
    fine-tuning phases).
    """

    def __init__(self, in_dim: int, dims: Sequence[int] = (1000, 500, 125), noise_sd: float = 0.4,
                 dropout: float = 0.0):
        super().__init__()
        self.in_dim = int(in_dim)
        self.dims = [int(d) for d in dims]
        if len(self.dims) != 3:
            raise ValueError("the scDAE encoder has exactly three layers: (hidden1, hidden2, code)")
        self.noise_sd = float(noise_sd)
        h1, h2, code = self.dims
        self.block1 = _dense_bn(self.in_dim, h1)
        self.block2 = _dense_bn(h1, h2)
        self.code = _dense_bn(h2, code)
        self.dropout = nn.Dropout(float(dropout))
        self.out_dim = code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_sd > 0:
            x = x + torch.randn_like(x) * self.noise_sd
        x = self.dropout(nn.functional.elu(self.block1(x)))
        x = self.dropout(torch.tanh(self.block2(x)))
        return self.code(x)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "dims": self.dims, "noise_sd": self.noise_sd,
                "dropout": self.dropout.p}


class DenoisingDecoder(nn.Module):
    """scDAE decoder, the encoder mirrored: 125 -> 500 (tanh) -> 1000 (ELU) -> genes (sigmoid)."""

    def __init__(self, code_dim: int, dims: Sequence[int] = (500, 1000), out_dim: int = 2000,
                 dropout: float = 0.0):
        super().__init__()
        h1, h2 = (int(d) for d in dims)
        self.block1 = _dense_bn(int(code_dim), h1)
        self.block2 = _dense_bn(h1, h2)
        self.out = _dense_bn(h2, int(out_dim))
        self.dropout = nn.Dropout(float(dropout))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.tanh(self.block1(code)))
        x = self.dropout(nn.functional.elu(self.block2(x)))
        return torch.sigmoid(self.out(x))


# ---------------------------------------------------------------- heads


class LinearHead(nn.Module):
    """One linear layer to class logits (LR's whole model; ACTINN's last layer)."""

    def __init__(self, in_dim: int, n_classes: int, xavier: bool = False):
        super().__init__()
        self.in_dim, self.n_classes, self.xavier = int(in_dim), int(n_classes), bool(xavier)
        self.linear = nn.Linear(self.in_dim, self.n_classes)
        if self.xavier:
            _xavier(self)
        else:
            # Logistic regression starts from zero, like the convex solvers it stands for.
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "n_classes": self.n_classes, "xavier": self.xavier}


class ScdaeHead(nn.Module):
    """scDAE classifier: z -> 125 (ELU) -> 125 (ELU) -> classes, each layer dense + batch norm.

    The original also batch-normalises the logits layer; we keep that. Dropout 0.7 is the
    original's keep probability of 0.3.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dims: Sequence[int] = (125, 125),
                 dropout: float = 0.7):
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.hidden_dims = [int(d) for d in hidden_dims]
        self.dropout_p = float(dropout)
        layers: list[nn.Module] = []
        width = self.in_dim
        for d in self.hidden_dims:
            layers += [_dense_bn(width, d), nn.ELU(), nn.Dropout(self.dropout_p)]
            width = d
        layers.append(_dense_bn(width, self.n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)

    def get_config(self) -> dict:
        return {"in_dim": self.in_dim, "n_classes": self.n_classes,
                "hidden_dims": self.hidden_dims, "dropout": self.dropout_p}


# ---------------------------------------------------------------- base models


class BaseModel(nn.Module):
    """``f(g(x))`` with its preprocessing: ``forward`` gives logits, ``embed`` gives z = g(x)."""

    name = "base"

    def __init__(self, preprocess: GeneSelecting, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.head = head

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    @property
    def embed_dim(self) -> int:
        return self.encoder.out_dim

    def embed(self, counts: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(counts))

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(counts))


class LogisticRegression(BaseModel):
    name = "lr"

    def __init__(self, preprocess: GeneSelecting, n_classes: int):
        encoder = IdentityEncoder(preprocess.out_dim)
        super().__init__(preprocess, encoder, LinearHead(encoder.out_dim, n_classes))


class LinearSVM(LogisticRegression):
    """The margin base: LR's graph (one linear layer on its preprocessing), trained on the
    one-vs-rest squared hinge (LinearSVC's loss); its margins become probabilities by the
    chain's temperature, fitted on validation like every chain's."""

    name = "svm"


class Actinn(BaseModel):
    name = "actinn"

    def __init__(self, preprocess: GeneSelecting, n_classes: int,
                 hidden_dims: Sequence[int] = (100, 50, 25)):
        encoder = ActinnEncoder(preprocess.out_dim, hidden_dims)
        super().__init__(preprocess, encoder, LinearHead(encoder.out_dim, n_classes, xavier=True))


class ScDAE(BaseModel):
    """Denoising autoencoder + classifier. The decoder is used for training only: it is not
    part of g or f, so it is not in the exported chain."""

    name = "scdae"

    def __init__(self, preprocess: GeneSelecting, n_classes: int,
                 encoder_dims: Sequence[int] = (1000, 500, 125),
                 classifier_dims: Sequence[int] = (125, 125), noise_sd: float = 0.4,
                 dropout: float = 0.7):
        encoder = DenoisingEncoder(preprocess.out_dim, encoder_dims, noise_sd)
        head = ScdaeHead(encoder.out_dim, n_classes, classifier_dims, dropout)
        super().__init__(preprocess, encoder, head)
        self.decoder = DenoisingDecoder(encoder.out_dim, list(reversed(encoder.dims[:2])),
                                        preprocess.out_dim)

    def set_dropout(self, p: float) -> None:
        """Dropout of the autoencoder's hidden layers (0 while pretraining, as the original)."""
        self.encoder.dropout.p = p
        self.decoder.dropout.p = p


BASE_MODELS: dict[str, type[BaseModel]] = {"lr": LogisticRegression, "svm": LinearSVM, "actinn": Actinn,
                                           "scdae": ScDAE}


def _xavier(module: nn.Module) -> None:
    """ACTINN's initialisation: Xavier (Glorot) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
