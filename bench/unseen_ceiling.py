"""How separable are a split's unseen types at all? An upper bound for any novelty score.

    python bench/unseen_ceiling.py --split-dir S_UNSEEN --full-split-dir S_FULL

``S_UNSEEN`` is a split made with ``--unseen-types N`` and ``S_FULL`` the same setting and seed
without it (the same cells: the unseen split only drops the drawn types' training and
validation cells). On each, LR is fitted with its default recipe (every choice on
validation) and scored on the test cells:

- *without the unseen types* (what an annotator can do): the AUROC, unseen against seen test
  cells, of every novelty score of ``train/open_set.py`` (1 - top probability, energy, kNN,
  centroid, expression), and for each the share of unseen and of seen test cells above the
  score's 95th and 99th percentile on validation;
- *with them* (the oracle, which has seen labelled cells of the "unseen" types): the AUROC of
  the probability it gives the unseen types together, and their per-type test F1.

The oracle is supervised, so no novelty score computed without those cells should be
expected to separate them better; when the oracle itself stays below an AUROC aim, the aim
asks more than the data holds. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import f1_score

from cellcontrast.data.split_data import load_split_data
from cellcontrast.nn.chain import predict_logits
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.chain import build_chain
from cellcontrast.train.open_set import SCORES, NoveltyScorer, auroc


def _fit_lr(data, seed: int):
    model = fit_base(data.X["train"], data.y["train"], data.X["val"], data.y["val"], len(data.classes), "lr",
                     seed=seed)
    return build_chain(model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split-dir", required=True, help="the split with --unseen-types")
    p.add_argument("--full-split-dir", required=True, help="the same setting and seed without it")
    args = p.parse_args(argv)
    open_data = load_split_data(args.split_dir)
    full = load_split_data(args.full_split_dir)
    unseen = open_data.unseen_types
    if not unseen:
        raise SystemExit(f"{args.split_dir} has no unseen types; make it with --unseen-types N")
    seed = int(open_data.info["seed"])

    chain = _fit_lr(open_data, seed)
    scorer = NoveltyScorer(chain, open_data.X["train"], open_data.y["train"], seed)
    val, seen, unseen_scores = (scorer.scores(open_data.X[part]) for part in ("val", "test", "unseen"))
    without = {}
    for name in SCORES:
        without[f"auroc_{name}"] = round(auroc(seen[name], unseen_scores[name]), 4)
        for q in (0.95, 0.99):
            threshold = np.quantile(val[name], q)
            without[f"{name}_q{round(q * 100)}_unseen_seen"] = [
                round(float((unseen_scores[name] > threshold).mean()), 3),
                round(float((seen[name] > threshold).mean()), 3)]

    oracle = _fit_lr(full, seed)
    probs = np.exp(predict_logits(oracle, full.X["test"]).astype(np.float64) / float(oracle.temperature))
    probs /= probs.sum(axis=1, keepdims=True)
    cols = [full.classes.index(t) for t in unseen]
    is_unseen = np.isin(full.y["test"], cols)
    score = probs[:, cols].sum(axis=1)
    pred = probs.argmax(axis=1)
    row = {
        "unseen_types": unseen, "seen_test_cells": int((~is_unseen).sum()), "unseen_test_cells": int(is_unseen.sum()),
        "without": without,
        "auroc_oracle": auroc(score[~is_unseen], score[is_unseen]),
        "oracle_f1_of_unseen_types": dict(zip(unseen, np.round(f1_score(full.y["test"], pred, labels=cols,
                                                                        average=None), 3).tolist(), strict=True)),
        "oracle_test_macro_f1": float(f1_score(full.y["test"], pred, average="macro")),
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
