"""Chain: probabilities, embeddings, save/load round trip, batching, traceability."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellcontrast.nn.bases import Actinn, LinearHead, LogisticRegression, ScDAE, ScdaeHead
from cellcontrast.nn.chain import ChainModule, load_chain, predict_proba, save_chain
from cellcontrast.nn.components import MLPComponent, MLSComponent
from cellcontrast.nn.preprocessing import ActinnPreprocess, LRPreprocess, ScdaePreprocess

torch.set_num_threads(1)
N_CLASSES = 4


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(2, 0.3, (30, 80)).astype(np.float32)
    x[3] = 0  # an empty cell
    return sp.csr_matrix(x)


def make_chain(base, component, counts):
    torch.manual_seed(0)
    if base == "lr":
        model = LogisticRegression(LRPreprocess.fit(counts, n_hvg=40), N_CLASSES)
        torch.nn.init.normal_(model.head.linear.weight)  # zero init would hide mistakes
    elif base == "actinn":
        model = Actinn(ActinnPreprocess.fit(counts), N_CLASSES, hidden_dims=(20, 10, 6))
    else:
        model = ScDAE(ScdaePreprocess.fit(counts, n_hvg=40), N_CLASSES, encoder_dims=(32, 16, 8),
                      classifier_dims=(8, 8))
        model.train()
        model(torch.as_tensor(counts.toarray()))  # move batch-norm running stats off defaults
    if component == "none":
        return ChainModule(model.preprocess, model.encoder, None, model.head).eval()
    d = model.embed_dim
    h = MLPComponent(d, 12, 5) if component == "mlp" else MLSComponent(d, N_CLASSES, 12)
    head = (ScdaeHead(h.out_dim, N_CLASSES, (8, 8)) if base == "scdae"
            else LinearHead(h.out_dim, N_CLASSES, xavier=True))
    if base == "scdae":
        head.train()
        head(h(model.embed(torch.as_tensor(counts.toarray()))).detach())
    return ChainModule(model.preprocess, model.encoder, h, head).eval()


COMBINATIONS = [(b, c) for b in ("lr", "actinn", "scdae") for c in ("none", "mlp", "mls")]


@pytest.mark.parametrize("base,component", COMBINATIONS)
def test_round_trip_gives_identical_predictions(base, component, counts, tmp_path):
    chain = make_chain(base, component, counts)
    genes = [f"g{i}" for i in range(counts.shape[1])]
    classes = [f"type{i}" for i in range(N_CLASSES)]
    config = {"genes": genes, "class_names": classes, "run_id": "abc", "metrics": {"top1": np.float64(0.5)}}
    save_chain(chain, config, tmp_path)
    loaded, loaded_config = load_chain(tmp_path)
    np.testing.assert_array_equal(predict_proba(chain, counts), predict_proba(loaded, counts))
    x = torch.as_tensor(counts[:5].toarray())
    with torch.no_grad():
        assert torch.equal(chain.embed(x), loaded.embed(x))
    assert loaded_config["base"] == base and loaded_config["component"] == component
    assert loaded_config["genes"] == genes and loaded_config["class_names"] == classes
    assert loaded_config["run_id"] == "abc" and loaded_config["metrics"] == {"top1": 0.5}
    assert loaded_config["n_genes"] == counts.shape[1] and loaded_config["n_classes"] == N_CLASSES
    assert isinstance(loaded_config["preprocessing"], str)
    assert set(loaded_config["modules"]) == {"preprocess", "encoder", "component", "head"}
    # chain.pt is a plain state_dict of tensors, loadable without unpickling code.
    state = torch.load(tmp_path / "chain.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("base,component", [("lr", "mls"), ("scdae", "mlp")])
def test_probabilities_embedding_and_batching(base, component, counts):
    chain = make_chain(base, component, counts)
    proba = predict_proba(chain, counts, batch_size=7)
    assert proba.shape == (counts.shape[0], N_CLASSES)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(proba, predict_proba(chain, counts), atol=1e-6)
    np.testing.assert_allclose(proba, predict_proba(chain, counts.toarray()), atol=1e-6)
    z = chain.embed(torch.as_tensor(counts[:2].toarray()))
    assert z.shape == (2, chain.component.out_dim)


def test_config_lists_must_match_the_chain(counts, tmp_path):
    chain = make_chain("lr", "none", counts)
    with pytest.raises(ValueError):
        save_chain(chain, {"genes": ["a", "b"]}, tmp_path)


@pytest.mark.parametrize("base,component", [("lr", "mlp"), ("actinn", "mls"), ("scdae", "mls")])
def test_trace_has_no_data_dependent_control_flow(base, component, counts):
    """A graph traced on one batch size gives the eager result on another: what ONNX needs."""
    chain = make_chain(base, component, counts)
    x = torch.as_tensor(counts.toarray())
    with torch.no_grad():
        traced = torch.jit.trace(chain, x[:4])
        torch.testing.assert_close(traced(x), chain(x))
