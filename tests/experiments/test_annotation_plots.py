"""`annotate --plots DIR`: the PNG files, drawn before the outputs are written."""

from __future__ import annotations

import pytest

from cellcontrast.cli.entry import main
from tiny_onnx import MODEL_GENES, build_model, make_counts, write_query

pytest.importorskip("umap")


def test_plots_are_written_with_the_annotation_and_a_bad_folder_writes_nothing(tmp_path, capsys):
    model = build_model(tmp_path / "tiny.onnx")
    import pandas as pd

    counts = make_counts(120, len(MODEL_GENES), seed=5)
    obs = pd.DataFrame({"truth": pd.Categorical(["B cell", "T cell", "NK cell"] * 40)},
                       index=[f"c{i}" for i in range(120)])
    query = write_query(tmp_path / "q.h5ad", counts, MODEL_GENES, obs=obs)
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out), "--majority-voting",
                 "--plots", str(tmp_path / "plots"), "--label-key", "truth"]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["accuracy_per_label.png", "contingency.png", "label_counts.png", "umap_confidence.png",
                       "umap_labels.png"]
    assert all((tmp_path / "plots" / name).stat().st_size > 5_000 for name in written)
    assert out.exists()

    (tmp_path / "a_file").write_text("x")
    other = tmp_path / "other.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(other), "--plots", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err and not other.exists()


def test_flagged_cells_get_their_own_plot(tmp_path):
    import cellcontrast as cc
    from cellcontrast.data.simulate import simulate_atlas

    atlas = simulate_atlas(n_cells=400, n_types=4, n_genes=80, n_individuals=1, seed=2)
    model = cc.fit(atlas, "cell_type", params={"lr": {"l2_path": [1e-2]}}).export(tmp_path / "m.onnx")
    atlas.write_h5ad(tmp_path / "q.h5ad")
    plots = tmp_path / "plots"
    assert main(["annotate", str(model), str(tmp_path / "q.h5ad"), "--out", str(tmp_path / "o.h5ad"),
                 "--flag-unseen", "--plots", str(plots)]) == 0
    assert (plots / "unfamiliar.png").stat().st_size > 5_000
