"""The package's shape: sizes, private names, the public API and what importing it loads.

The layer contracts themselves are import-linter's (pyproject.toml, run by `make test`).
"""

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cellcontrast as cc

PACKAGE = Path(cc.__file__).parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("cellcontrast", *path.relative_to(PACKAGE).with_suffix("").parts))
        yield name.removesuffix(".__init__"), path, ast.parse(path.read_text())


def test_no_module_or_function_is_too_long():
    too_long = []
    for name, path, tree in _modules():
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(path.read_text().splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long


def _private_names_taken(name: str, tree: ast.Module) -> list[str]:
    """``from other import _x`` and ``other_module._x`` where ``other`` is a cellcontrast module."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellcontrast"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name} imports {node.module}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cellcontrast"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_takes_another_modules_private_names():
    found = [f for name, _, tree in _modules() for f in _private_names_taken(name, tree)]
    assert not found, found


def test_the_check_finds_a_private_name_taken():
    tree = ast.parse("from cellcontrast.nn.chain import _x\nimport cellcontrast.nn.chain as c\nc._y")
    assert len(_private_names_taken("m", tree)) == 2


def test_public_api_shape():
    assert set(cc.__all__) >= {"annotate", "annotate_file", "Annotator", "fit", "Chain", "InputError"}
    assert issubclass(cc.InputError, ValueError)
    sig = inspect.signature(cc.annotate)
    assert list(sig.parameters)[:2] == ["adata", "model"]
    keyword_only = {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert {"layer", "min_confidence", "key_added", "copy"} <= keyword_only
    assert sig.parameters["min_confidence"].default == 0.5 and sig.parameters["key_added"].default == "cellcontrast"
    sig = inspect.signature(cc.fit)
    assert list(sig.parameters)[:2] == ["adata", "labels_key"] and sig.parameters["labels_key"].default == "cell_type"
    keyword_only = {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert {"base", "component", "layer", "seed", "params"} <= keyword_only
    assert list(inspect.signature(cc.annotate_file).parameters)[:3] == ["model", "query", "out"]
    for owner, method in ((cc.Chain, "load"), (cc.Chain, "export"), (cc.Chain, "save"), (cc.Annotator, "load"),
                          (cc.Annotator, "predict_proba")):
        assert callable(getattr(owner, method)), method


@pytest.mark.parametrize("name", ["annotate", "annotate_file", "fit", "Chain", "Annotator"])
def test_public_names_have_numpy_style_docstrings(name):
    doc = inspect.getdoc(getattr(cc, name)) or ""
    assert ("Parameters\n----------" in doc) or ("Attributes\n----------" in doc), name


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_no_torch():
    loaded = _run("import sys, json, cellcontrast as cc; cc.annotate; cc.Annotator; "
                  "print(json.dumps(sorted(m for m in ('torch', 'mlflow', 'optuna', 'sklearn') if m in sys.modules)))")
    assert loaded == []


def test_annotate_runs_without_torch_mlflow_or_optuna(tmp_path, small_atlas):
    chain = cc.fit(small_atlas[:1500].copy(), "cell_type", params={"lr": {"n_hvg": 100, "l2_path": [1e-2]}})
    model = chain.export(tmp_path / "m.onnx")
    small_atlas[1500:1800].copy().write_h5ad(tmp_path / "q.h5ad")
    code = (f"import sys, json, anndata, cellcontrast as cc\n"
            f"q = anndata.read_h5ad({str(tmp_path / 'q.h5ad')!r})\n"
            f"cc.annotate(q, {str(model)!r})\n"
            "assert 'cellcontrast_label' in q.obs\n"
            "print(json.dumps(sorted(m for m in ('torch', 'mlflow', 'optuna', 'sklearn') if m in sys.modules)))")
    assert _run(code) == []


def test_no_subpackage_hides_a_public_name():
    """Importing a subpackage binds its name on the package: one called like a public function
    would replace it (cc.annotate became a module once cellcontrast.annotate.* was imported)."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert not subpackages & set(cc.__all__)
    # the subpackages imported first, as cc.fit and the command line do
    code = ("import json, cellcontrast.annotation.api, cellcontrast.model, cellcontrast as cc; "
            "print(json.dumps([callable(cc.annotate), cc.annotate.__module__]))")
    assert _run(code) == [True, "cellcontrast.annotation.api"]
