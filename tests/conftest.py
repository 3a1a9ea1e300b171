"""Shared fixtures: a small simulated atlas, written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def small_atlas():
    from cellcontrast.simulate import simulate_atlas

    return simulate_atlas(n_cells=3000, n_types=20, n_genes=200, n_individuals=2, seed=1)


@pytest.fixture(scope="session")
def small_atlas_path(small_atlas, tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas") / "atlas.h5ad"
    small_atlas.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def small_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(
        "settings:\n"
        "  default: {k: 8, cap: 60, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
        "  scarce: {k: 12, cap: 30, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
        "  natural: {k: 12, cap: 200, equalize: false, fractions: [0.8, 0.1, 0.1]}\n"
    )
    return path
