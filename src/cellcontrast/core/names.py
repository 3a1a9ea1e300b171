"""The names of the models and metrics, written once."""

BASES = ("lr", "actinn", "scdae")
COMPONENTS = ("none", "mlp", "mls")
# Every chain by name ("lr", "lr+mlp", ...), simplest first: the order ties and the
# one-standard-error rule prefer.
CHAINS_SIMPLEST_FIRST = tuple(b if c == "none" else f"{b}+{c}" for b in BASES for c in COMPONENTS)
# The paper's metrics, as keys of every metrics dictionary (val_top1, test_macro_f1, ...).
METRICS = ("top1", "top3", "macro_f1")
# The obs column that holds the cell type once an atlas has been read.
LABEL = "cell_type"

# ``n_hvg: all``: no gene selection (what CellTypist does); a number keeps the most dispersed genes.
ALL_GENES = "all"
# LR's ``n_hvg: auto``: its ``auto_hvg`` most dispersed genes and every gene, the better on validation.
AUTO_GENES = "auto"
