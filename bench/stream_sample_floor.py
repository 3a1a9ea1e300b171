"""What the sample's per-type floor does to the refit's validation scores (`fit` read in chunks).

    OMP_NUM_THREADS=1 .venv/bin/python bench/stream_sample_floor.py \\
        --reference ../fit-scale/ref_250000c_2000g/reference.h5ad --query ../fit-scale/ref_250000c_2000g/query.h5ad \\
        --floor 2 [--chains lr]

`cellcontrast.fit_annotator` on a reference above `max_cells_in_memory`, with
`fit_stream.MIN_SAMPLE_PER_TYPE` set to ``--floor`` (the default keeps 100 cells of each type in
the sample). Prints one JSON line: the sample's validation macro F1 of the sample fit and after
each refit epoch (what the model card shows), the training loss by epoch, and the macro F1 on the
query (a new individual).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--floor", type=int, required=True)
    p.add_argument("--chains", default="lr")
    args = p.parse_args()

    import anndata as ad
    import numpy as np
    from sklearn.metrics import f1_score

    from cellcontrast.experiments import fit_stream
    from cellcontrast.experiments.fit_annotator import fit_annotator

    fit_stream.MIN_SAMPLE_PER_TYPE = args.floor
    started = time.perf_counter()
    fitted = fit_annotator(args.reference, chains=args.chains, experiment=None)
    query = ad.read_h5ad(args.query)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    pred = np.asarray(fitted.chain.classes)[fitted.chain.predict_proba(query).argmax(1)]
    labels = sorted(set(fitted.chain.classes) & (set(truth) | set(pred)))
    streamed = fitted.chain.config["fit"]["streamed"]
    print(json.dumps({"floor": args.floor, "chosen": fitted.chosen, "seconds": round(time.perf_counter() - started),
                      "sample_cells": streamed.get("sample_cells"), "val_macro_f1_by_epoch": streamed.get("val_macro_f1"),
                      "train_loss_by_epoch": streamed.get("losses"),
                      "query_macro_f1": round(f1_score(truth, pred, labels=labels, average="macro", zero_division=0), 4)}))


if __name__ == "__main__":
    main()
