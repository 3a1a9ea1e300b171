"""Export a trained chain to ONE self-contained ONNX file, and log/register it in MLflow.

The file holds the whole chain `preprocess -> encoder -> component -> head -> softmax` as one
graph with input ``counts`` (float32 ``[batch, n_genes]``, raw counts in the model's gene
order, dynamic batch axis) and output ``probabilities`` (``[batch, n_classes]``), plus
``embedding`` when the chain exposes one (an ``embed(counts)`` method). Every tensor is
embedded in the file: there is never an external-data side file. ``metadata_props`` carry
what `cellcontrast annotate` needs without torch: the gene list, the class names, the
preprocessing, the source run id and its metrics (see `METADATA_KEYS`).

Sources for the CLI (`cellcontrast export`): a saved chain folder (``--model-dir``), an MLflow
run's ``chain`` artifact (``--run-id``), or the FINISHED run of an experiment with the best
*validation* macro F1 (``--best``; test metrics are never used to choose).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from cellcontrast.core.version import __version__
from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path

INPUT_NAME = "counts"
PROBABILITIES = "probabilities"
EMBEDDING = "embedding"
REGISTERED_MODEL_NAME = "cellcontrast-annotator"
SELECTION_METRIC = "val_macro_f1"
# Keys written into the ONNX file's metadata_props (all values are strings; lists/dicts JSON).
METADATA_KEYS = (
    "genes", "classes", "preprocessing", "base", "component", "run_id", "metrics",
    "cellcontrast_version", "input_name", "output_names", "opset",
)


# --------------------------------------------------------------------------------------
# The ONNX export itself
# --------------------------------------------------------------------------------------


def _wrap(chain, with_embedding: bool):
    """A module whose forward returns (probabilities,) or (probabilities, embedding)."""
    import torch

    class _Export(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, counts):
            if with_embedding:
                embedding = self.inner.embed(counts)
                if hasattr(self.inner, "classify"):  # one pass through the encoder for both outputs
                    return self.inner.classify(embedding), embedding
                return self.inner(counts), embedding
            return self.inner(counts)

    return _Export(chain).eval()


def _example_counts(n_genes: int, n_cells: int = 5, seed: int = 0):
    """Poisson counts with varied library sizes (and one all-zero cell) to trace and verify."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rate = torch.rand(n_cells, 1, generator=gen) * 3.0 + 0.1
    counts = torch.poisson(rate.expand(n_cells, n_genes).contiguous(), generator=gen)
    counts[-1] = 0.0
    return counts.float()


@contextlib.contextmanager
def _quiet_torch_logs():
    """Silence the exporter's INFO/WARNING chatter (e.g. 'torchvision is not installed')."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torch_to_proto(module, example, output_names: list[str], opset: int):
    """Trace `module` to an onnx ModelProto, dynamo exporter first, TorchScript exporter as fallback."""
    import onnx
    import torch

    dynamo_error: Exception | None = None
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[INPUT_NAME],
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        return program.model_proto
    except Exception as err:  # noqa: BLE001 - any dynamo failure: try the legacy exporter
        dynamo_error = err
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=output_names,
                opset_version=min(opset, 18),
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *output_names]},
            )
    except Exception as err:
        raise RuntimeError(
            f"ONNX export failed with both exporters: dynamo: {dynamo_error}; torchscript: {err}"
        ) from err
    return onnx.load_model_from_string(buffer.getvalue())


def _metadata(config: dict, output_names: list[str], opset: int) -> dict[str, str]:
    metrics = config.get("metrics") or {}
    clean_metrics = {
        str(k): float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))
    }
    return {
        "genes": json.dumps([str(g) for g in config["genes"]]),
        "classes": json.dumps([str(c) for c in config["classes"]]),
        "preprocessing": str(config.get("preprocessing", "")),
        "base": str(config.get("base", "")),
        "component": str(config.get("component", "")),
        "run_id": str(config.get("run_id") or ""),
        "metrics": json.dumps(clean_metrics),
        "cellcontrast_version": __version__,
        "input_name": INPUT_NAME,
        "output_names": json.dumps(output_names),
        "opset": str(opset),
    }


def normalize_config(config: dict) -> dict:
    """A copy of `config` with "classes" filled from "class_names" (the chain module's key)."""
    config = dict(config)
    if not config.get("classes") and config.get("class_names"):
        config["classes"] = list(config["class_names"])
    return config


def _check_config(config: dict) -> None:
    for key in ("genes", "classes"):
        values = config.get(key)
        if not isinstance(values, list | tuple) or len(values) == 0:
            raise InputError(f"the chain's config has no {key!r} list; re-save the chain with `cellcontrast train`")
    if len(set(map(str, config["genes"]))) != len(config["genes"]):
        raise InputError("the chain's config lists duplicated gene names; re-save the chain with unique genes")


def _verify(proto, module, output_names: list[str], n_genes: int, atol: float = 1e-4) -> None:
    """Run the exported graph with onnxruntime at batch 1 and 7 and compare with torch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for n in (1, 7):
        counts = _example_counts(n_genes, n_cells=n, seed=n)
        with torch.no_grad():
            expected = module(counts)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(output_names, {INPUT_NAME: counts.numpy()})
        for name, want, have in zip(output_names, expected, got, strict=True):
            want = want.detach().numpy()
            if want.shape != have.shape or not np.allclose(want, have, atol=atol, rtol=1e-4):
                diff = float(np.max(np.abs(want - have))) if want.shape == have.shape else float("nan")
                raise RuntimeError(
                    f"ONNX output {name!r} differs from torch at batch {n} (max abs diff {diff:.3g})"
                )


def export_chain_to_onnx(chain, config: dict, out_path: str | os.PathLike, opset: int = 18) -> Path:
    """Export `chain` (counts [B, G] -> probabilities [B, C]) as one self-contained ONNX file.

    Writes `out_path` atomically and returns it. The graph is checked with
    `onnx.checker.check_model` and run once with onnxruntime against torch before writing.
    """
    import onnx
    import torch

    config = normalize_config(config)
    _check_config(config)
    n_genes = len(config["genes"])
    n_classes = len(config["classes"])
    chain = chain.eval()

    example = _example_counts(n_genes)
    with torch.no_grad():
        try:
            probs = chain(example)
        except Exception as err:
            raise InputError(
                f"the chain does not accept counts of shape [batch, {n_genes}] (its config lists "
                f"{n_genes} genes): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
    if tuple(probs.shape) != (example.shape[0], n_classes):
        raise InputError(
            f"the chain outputs shape {tuple(probs.shape)} but its config lists {n_classes} classes; "
            "re-save the chain with a matching config"
        )

    # An embedding output only if the chain exposes one and it traces cleanly.
    candidates = []
    if callable(getattr(chain, "embed", None)):
        candidates.append(True)
    candidates.append(False)
    proto = module = output_names = None
    last_error: Exception | None = None
    for with_embedding in candidates:
        output_names = [PROBABILITIES, EMBEDDING] if with_embedding else [PROBABILITIES]
        module = _wrap(chain, with_embedding)
        try:
            proto = _torch_to_proto(module, example, output_names, opset)
            _verify(proto, module, output_names, n_genes)
            break
        except Exception as err:  # noqa: BLE001 - retry without the embedding output
            last_error = err
            proto = None
    if proto is None:
        raise RuntimeError(f"ONNX export failed: {last_error}") from last_error

    proto.doc_string = (
        "cellcontrast cell-type annotator: raw counts [batch, genes] in the order of metadata "
        "'genes' -> class probabilities [batch, classes] in the order of metadata 'classes'."
    )
    proto.producer_name = "cellcontrast"
    proto.producer_version = __version__
    del proto.metadata_props[:]
    for key, value in _metadata(config, output_names, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        # save_as_external_data=False: every initializer inside the one .onnx file.
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        _umask_mode(tmp)
    return out_path


def _umask_mode(path: Path) -> None:
    """Give the file the usual mode (0666 minus umask) rather than mkstemp's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an exported annotator (JSON values parsed)."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    meta: dict[str, Any] = {p.key: p.value for p in model.metadata_props}
    for key in ("genes", "classes", "metrics", "output_names"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


# --------------------------------------------------------------------------------------
# MLflow: find the source chain, log and register the export
# --------------------------------------------------------------------------------------


def _load_chain_dir(model_dir: str | os.PathLike):
    from cellcontrast.nn.chain import load_chain

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"--model-dir {model_dir} is not a folder; pass the folder holding chain.pt and config.json")
    missing = [name for name in ("chain.pt", "config.json") if not (model_dir / name).exists()]
    if missing:
        raise InputError(
            f"{model_dir} has no {' or '.join(missing)}; pass a folder saved by `cellcontrast train`"
        )
    try:
        chain, config = load_chain(model_dir)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot load the chain in {model_dir}: {_first_line(err)}") from err
    return chain, normalize_config(config)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _download_chain(client, run_id: str, dst: str):
    import mlflow

    try:
        artifacts = client.list_artifacts(run_id, "chain")
    except Exception as err:
        raise InputError(f"cannot list the artifacts of run {run_id}: {_first_line(err)}") from err
    if not artifacts:
        raise InputError(
            f"run {run_id} has no 'chain' artifact; pass the id of a `cellcontrast train` run, or --model-dir"
        )
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="chain", dst_path=dst)
    except Exception as err:
        raise InputError(f"cannot download the chain of run {run_id}: {_first_line(err)}") from err
    return _load_chain_dir(local)


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:
        raise InputError(
            f"unknown MLflow run id {run_id!r} (tracking URI {_tracking_uri()}); "
            "list runs with `mlflow runs list` or use --best"
        ) from err


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def find_best_run(client, experiment: str, tags: dict[str, str] | None = None):
    """The FINISHED run of `experiment` with a chain and the highest validation macro F1,
    among runs whose tags match `tags` (for example one setting and seed)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(
            f"no MLflow experiment named {experiment!r} at {_tracking_uri()}; train first or pass --experiment"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(
            ["attributes.status = 'FINISHED'"] + [f"tags.{k} = '{v}'" for k, v in (tags or {}).items()]
        ),
        order_by=[f"metrics.{SELECTION_METRIC} DESC"],
        max_results=5000,
    )
    scored = [
        r for r in runs
        if SELECTION_METRIC in r.data.metrics and math.isfinite(r.data.metrics[SELECTION_METRIC])
        and r.data.tags.get("cellcontrast.kind") != "export"
    ]
    # Sort again in Python: stable, NaN-free, independent of the backend's NULL ordering.
    scored.sort(key=lambda r: -r.data.metrics[SELECTION_METRIC])
    for run in scored:
        if client.list_artifacts(run.info.run_id, "chain"):
            return run
    raise InputError(
        f"experiment {experiment!r} has no FINISHED run with metric {SELECTION_METRIC} and a "
        "'chain' artifact; run `cellcontrast train` first"
    )


def _register(out_path: Path, config: dict, source_run_id: str | None, experiment: str) -> str:
    """Log the ONNX file with MLflow's ONNX flavour in a new run and register a model version."""
    import mlflow
    import onnx

    from cellcontrast.experiments import tracking

    # Under `mlflow run` MLFLOW_RUN_ID names the project's run (in its own experiment):
    # starting a run in `experiment` with it set fails, so nest under it instead.
    tracking.setup(experiment)
    model = onnx.load_model(str(out_path))
    tags = {"cellcontrast.kind": "export", "source_run_id": source_run_id or "",
            "base": str(config.get("base", "")), "component": str(config.get("component", "")),
            **tracking.parent_tags()}
    with mlflow.start_run(run_name="export-onnx", tags=tags) as run:
        metrics = config.get("metrics") or {}
        mlflow.log_params({
            "source_run_id": source_run_id or "",
            "n_genes": len(config["genes"]),
            "n_classes": len(config["classes"]),
            f"source_{SELECTION_METRIC}": metrics.get(SELECTION_METRIC, ""),
        })
        info = mlflow.onnx.log_model(
            model,
            name="annotator",
            registered_model_name=REGISTERED_MODEL_NAME,
            save_as_external_data=False,
        )
        mlflow.log_artifact(str(out_path), artifact_path="onnx")
    version = getattr(info, "registered_model_version", None)
    return f"{REGISTERED_MODEL_NAME} v{version}" if version else f"run {run.info.run_id}"


def export_from_cli(args) -> Path:
    """`cellcontrast export`: pick the chain (--model-dir, --run-id or --best), export, register."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out_path = Path(args.out)
    if out_path.suffix.lower() != ".onnx":
        raise InputError(f"--out {out_path} should end in .onnx")
    source_run_id: str | None = None
    with tempfile.TemporaryDirectory(prefix="cellcontrast-export-") as tmp:
        if args.model_dir:
            chain, config = _load_chain_dir(args.model_dir)
            source_run_id = config.get("run_id") or None
            source = str(args.model_dir)
        else:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            if args.best:
                wanted = {k: str(v) for k, v in (("setting", args.setting), ("seed", args.seed)) if v is not None}
                run = find_best_run(client, args.experiment, wanted)
            else:
                run = _get_run(client, args.run_id)
            source_run_id = run.info.run_id
            chain, config = _download_chain(client, source_run_id, tmp)
            config = dict(config)
            config["run_id"] = source_run_id
            # The run's logged metrics are authoritative over the saved config.
            merged = dict(config.get("metrics") or {})
            merged.update(run.data.metrics)
            config["metrics"] = merged
            source = f"run {source_run_id}"
        export_chain_to_onnx(chain, config, out_path)

    registered = ""
    if not args.no_register:
        registered = _register(out_path, config, source_run_id, args.experiment)
    val = (config.get("metrics") or {}).get(SELECTION_METRIC)
    val_text = f"{SELECTION_METRIC}={val:.4f}" if isinstance(val, int | float) else f"{SELECTION_METRIC}=n/a"
    line = f"exported {out_path} from {source} ({val_text})"
    if registered:
        line += f"; registered as {registered}"
    print(line)
    return out_path
