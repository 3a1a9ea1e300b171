"""Atomic outputs: a file, or a set of files, appears whole under its final name or not at all."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cellcontrast.core.files import atomic_path, atomic_paths


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_gives_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_a_failed_second_rename_takes_the_first_back(tmp_path):
    (tmp_path / "b.csv").mkdir()  # a folder where the second file should go: its rename fails
    with pytest.raises(OSError), atomic_paths(tmp_path / "a.h5ad", tmp_path / "b.csv") as (a, b):
        a.write_text("h5ad")
        b.write_text("csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv"]


# The child annotates with a rename that pauses after moving its first file until the test has
# sent its signal (the test then writes `<marker>.sent`), so that the signal lands exactly
# between the two renames of the pair however busy the machine is.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    # Ctrl-C as at a terminal: a shell that starts jobs in the background (`cmd &`, as CI
    # runners may) hands them SIGINT ignored, and Python then never installs its handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_replace, marker = os.replace, Path(sys.argv[1])
    sent = marker.with_name(marker.name + ".sent")

    def paused_replace(src, dst):
        real_replace(src, dst)
        if not marker.exists():
            marker.write_text(str(dst))
            deadline = time.time() + 60
            while not sent.exists() and time.time() < deadline:
                time.sleep(0.02)

    os.replace = paused_replace
    from cellcontrast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_annotate_writes_its_pair_together_when_killed_between_renames(sig, tmp_path):
    pytest.importorskip("onnxruntime")
    import tiny_onnx

    model = tiny_onnx.build_model(tmp_path / "m.onnx")
    query = tiny_onnx.write_query(tmp_path / "q.h5ad", tiny_onnx.make_counts(50, 30), tiny_onnx.MODEL_GENES)
    out, csv, marker = tmp_path / "out.h5ad", tmp_path / "out.csv", tmp_path / "first-renamed"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), "annotate", str(model), str(query),
                             "--out", str(out), "--csv", str(csv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.stderr.read()
    proc.send_signal(sig)  # one of the pair is in place, the other not yet
    marker.with_name(marker.name + ".sent").write_text("")
    proc.wait(timeout=30)
    assert proc.returncode != 0  # the signal still ended the process, after the second rename
    assert out.exists() and csv.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name]
