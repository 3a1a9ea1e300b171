"""Where a contrastive chain loses on an imbalanced split: the embedding or step 4's head?

    .venv/bin/cellcontrast split --params params.yaml --atlas data/atlas.h5ad --setting natural \
        --seed 0 --out-dir /tmp/nat/s0
    .venv/bin/python bench/diagnose_component_head.py lr /tmp/nat/s0     # or actinn

Validation only (test.h5ad is never opened). Fits the base, then MLP-CL with its default recipe
under two batch samplers (the package's class-aware one, and an experimental one that draws
every type equally often), and prints for each the nearest-centroid probe on h(z) and the
val macro F1 (and of the rarest ten types) of step 4's linear head fitted three ways: the base's
Adam recipe, L-BFGS along LR's L2 path (to 1e-4), and L-BFGS along the component path (to 1e-6).
About 4 minutes a base on the atlas's natural split (43k training cells), one thread.
"""
import math
import sys
import time

import numpy as np
import torch
from sklearn.metrics import f1_score

from cellcontrast.data.split_data import load_split_data
from cellcontrast.train import sampler as sampler_mod
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.component import (
    centroid_f1,
    embed_frozen,
    fresh_head,
    train_component,
    train_head_on_component,
)
from cellcontrast.train.loops import EncoderHead, FeatureSource, fit_linear_lbfgs
from cellcontrast.train.recipes import COMPONENT_HEAD_L2_PATH, resolve_params

torch.set_num_threads(1)
base = sys.argv[1]
split = sys.argv[2]
d = load_split_data(split, parts=("train", "val"))
C = len(d.classes)
ytr, yva = d.y["train"], d.y["val"]
counts = np.bincount(ytr, minlength=C)
rare = np.argsort(counts)[:10]


def report(name, pred):
    per = f1_score(yva, pred, average=None, labels=np.arange(C))
    print(f"{name}: val macro F1 {per.mean():.3f} top1 {(pred == yva).mean():.3f} "
          f"rarest10 F1 mean {per[rare].mean():.2f}", flush=True)


t = time.time()
model = fit_base(d.X["train"], ytr, d.X["val"], yva, C, base, None, 0, None, for_component=True)
z_tr, z_va = embed_frozen(model, d.X["train"]), embed_frozen(model, d.X["val"])
with torch.no_grad():
    report(f"base {base} ({time.time()-t:.0f}s)", model.head(z_va).argmax(1).numpy())


Plain = sampler_mod.ClassAwareBatchSampler


class Balanced(Plain):
    """Every class the same number of groups an epoch (rare cells repeat)."""

    def _epoch_batches(self, epoch):
        orig = self._class_indices
        per_class = max(1, math.ceil(len(self.labels) / self.samples_per_class) // len(orig))
        rng = np.random.default_rng([self.seed, epoch, 7])
        need = per_class * self.samples_per_class
        self._class_indices = [np.concatenate([rng.permutation(i) for _ in range(math.ceil(need / len(i)))])[:need] for i in orig]
        try:
            return super()._epoch_batches(epoch)
        finally:
            self._class_indices = orig


lbfgs_p = resolve_params("lr", None)
for sname, cls in (("plain", Plain), ("balanced", Balanced)):
    sampler_mod.ClassAwareBatchSampler = cls
    t = time.time()
    h = train_component(z_tr, ytr, z_va, yva, C, "mlp", {}, 0, None)
    with torch.no_grad():
        e_tr, e_va = h(z_tr), h(z_va)
    print(f"{sname}: component {time.time()-t:.0f}s centroid F1 {centroid_f1(e_tr, ytr, e_va, yva, C):.3f}", flush=True)
    t = time.time()
    head = train_head_on_component(model, h, z_tr, ytr, z_va, yva, C, None, 0, None, solver="adam")
    with torch.no_grad():
        report(f"  {sname} head=recipe ({time.time()-t:.0f}s)", head(e_va).argmax(1).numpy())
    for path in (lbfgs_p["l2_path"], COMPONENT_HEAD_L2_PATH):
        t = time.time()
        torch.manual_seed(0)
        head = fresh_head(model, h.out_dim, C)
        net = EncoderHead(torch.nn.Identity(), head)
        fit_linear_lbfgs(net, FeatureSource(e_tr), ytr, FeatureSource(e_va), yva, C, {**lbfgs_p, "l2_path": path}, 0)
        with torch.no_grad():
            report(f"  {sname} head=lbfgs path to {min(path):g} l2 {net.l2:g} ({time.time()-t:.0f}s)", net(e_va).argmax(1).numpy())
