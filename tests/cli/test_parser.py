"""The command line's own refusals: a bad option is one line and exit code 2, like every
other refusal; --help still shows the usage."""

import pytest

from cellcontrast.cli import main
from cellcontrast.cli.parser import build_parser


@pytest.mark.parametrize(("argv", "words"), [
    (["annotate", "m.onnx", "q.h5ad", "--out", "o.h5ad", "--batch-size", "x"], ["--batch-size", "'x'"]),
    (["train", "--split-dir", "s", "--base", "rf"], ["--base", "rf"]),
    (["annotate", "m.onnx"], ["required", "query"]),
    (["annotate", "m.onnx", "q.h5ad"], ["required", "--out", "--out-dir"]),
    (["frobnicate"], ["frobnicate"]),
    ([], ["required", "COMMAND"]),
])
def test_bad_options_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cellcontrast") and "error:" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert captured.out == ""


def test_help_still_shows_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--help"])
    assert exit_info.value.code == 0
    assert "--min-confidence" in capsys.readouterr().out


def test_every_command_has_a_function():
    from cellcontrast.cli.commands import COMMANDS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_fit_defaults_are_the_python_apis():
    # the parser stays free of torch, so it repeats fit_annotator's defaults: they must agree
    import inspect

    from cellcontrast.experiments.fit_annotator import fit_annotator

    args = build_parser().parse_args(["fit", "--reference", "r.h5ad", "--out", "a.onnx"])
    defaults = {name: p.default for name, p in inspect.signature(fit_annotator).parameters.items()}
    for name in ("chains", "max_cells_in_memory", "sample_cells", "refit_epochs", "seed", "val_fraction", "test_fraction",
                 "workers", "checkpoints_on"):
        assert getattr(args, name) == defaults[name], name
    from cellcontrast.model.grouped import CHECKPOINTS_ON

    fit = next(a for a in build_parser()._actions if a.dest == "command").choices["fit"]
    assert next(a for a in fit._actions if a.dest == "checkpoints_on").choices == list(CHECKPOINTS_ON)
