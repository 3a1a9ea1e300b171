"""`make run`'s stage times: each finished command appends its row when CELLCONTRAST_STAGE_TIMES
names a file, a refused one does not, and the summary totals them by command."""

from __future__ import annotations

import pandas as pd

from cellcontrast.cli.entry import main
from cellcontrast.cli.stage_times import stage_of, summary


def test_finished_commands_append_their_time_and_refusals_do_not(tmp_path, monkeypatch, capsys):
    times = tmp_path / "reports" / "stage_times.csv"
    atlas = tmp_path / "atlas.h5ad"
    simulate = ["simulate", "--out", str(atlas), "--cells", "300", "--types", "3", "--genes", "60",
                "--individuals", "1"]
    assert main(simulate) == 0 and not times.exists()  # without the variable: nothing
    monkeypatch.setenv("CELLCONTRAST_STAGE_TIMES", str(times))
    assert main(simulate) == 0
    assert main(["split", "--atlas", str(atlas), "--setting", "nope", "--out-dir", str(tmp_path / "s")]) == 2
    assert main(simulate) == 0
    table = pd.read_csv(times)
    assert table["stage"].tolist() == ["simulate atlas.h5ad", "simulate atlas.h5ad"]
    assert (table["seconds"] >= 0).all()
    text = summary(times)
    assert "| simulate | 2 |" in text and "in 2 commands" in text


def test_a_stage_is_named_by_what_it_served():
    argv = ["--atlas", "data/atlas.h5ad", "--setting", "default", "--seed", "3", "--out-dir", "data/splits/default/seed3"]
    assert stage_of("split", argv) == "split default 3 seed3"
    assert stage_of("split", ["--setting", "scarce", "--tuning"]) == "split scarce tuning"
    assert stage_of("split", ["--setting", "scarce", "--tuning", "--out-dir", "s/scarce/tuning"]) == "split scarce tuning"
    assert stage_of("grid", []) == "grid"
