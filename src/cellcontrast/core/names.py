"""The names of the models and metrics, written once."""

BASES = ("lr", "svm", "actinn", "scdae")
# The bases that are one linear layer on LR's preprocessing (trained by L-BFGS along an L2 path).
LINEAR_BASES = ("lr", "svm")
COMPONENTS = ("none", "mlp", "mls")
# Every chain by name ("lr", "svm", "lr+mlp", ...), simplest first: the order ties and the
# one-standard-error rule prefer. The linear bases come first, then each base with its components.
CHAINS_SIMPLEST_FIRST = LINEAR_BASES + tuple(name for b in BASES for c in COMPONENTS
                                             if (name := b if c == "none" else f"{b}+{c}") not in LINEAR_BASES)
# The paper's metrics, as keys of every metrics dictionary (val_top1, test_macro_f1, ...).
METRICS = ("top1", "top3", "macro_f1")
# The obs column that holds the cell type once an atlas has been read.
LABEL = "cell_type"

# ``n_hvg: all``: no gene selection (what CellTypist does); a number keeps the most dispersed genes.
ALL_GENES = "all"
# LR's ``n_hvg: auto``: its ``auto_hvg`` most dispersed genes and every gene, the better on validation.
AUTO_GENES = "auto"

# The pseudo-batch column of `fit --val-folds` (model.grouped.stratified_folds): named so in
# notes and the model card.
CV_FOLD = "cross-validation fold"
