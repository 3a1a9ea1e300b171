"""Print the seed-0 results of the grid (both settings, 9 chains) beside the paper's Table 1.

    .venv/bin/python bench/seed0_table.py [reports/results.csv]
"""

import sys

import pandas as pd

PAPER = {  # Table 1 of the paper: (top1, top3, f1)
    "default": {"lr+none": (0.9285, 0.9935, 0.8633), "lr+mlp": (0.9267, 0.9915, 0.8445), "lr+mls": (0.9303, 0.9926, 0.8690),
                "actinn+none": (0.9174, 0.9864, 0.8165), "actinn+mlp": (0.9111, 0.9826, 0.7886), "actinn+mls": (0.9135, 0.9824, 0.7879),
                "scdae+none": (0.9238, 0.9868, 0.8660), "scdae+mlp": (0.9221, 0.9793, 0.8615), "scdae+mls": (0.9222, 0.9796, 0.8633)},
    "scarce": {"lr+none": (0.8188, 0.9570, 0.8148), "lr+mlp": (0.8349, 0.9516, 0.8302), "lr+mls": (0.8908, 0.9750, 0.8880),
               "actinn+none": (0.6285, 0.7761, 0.5771), "actinn+mlp": (0.3849, 0.5881, 0.3177), "actinn+mls": (0.4416, 0.6434, 0.3754),
               "scdae+none": (0.8848, 0.9732, 0.8803), "scdae+mlp": (0.8787, 0.9688, 0.8739), "scdae+mls": (0.8777, 0.9665, 0.8734)},
}


def main() -> None:
    results = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "reports/results.csv")
    seed0 = results[results["seed"] == 0]
    print("| setting | chain | top-1 | top-3 | macro F1 | paper top-1 / top-3 / F1 |")
    print("|---|---|---|---|---|---|")
    for setting in ("default", "scarce"):
        for base in ("lr", "actinn", "scdae"):
            for comp in ("none", "mlp", "mls"):
                row = seed0[(seed0.setting == setting) & (seed0.base == base) & (seed0.component == comp)]
                if row.empty:
                    continue
                r = row.iloc[0]
                paper = PAPER[setting][f"{base}+{comp}"]
                print(f"| {setting} | {base} + {comp} | {r.test_top1:.4f} | {r.test_top3:.4f} | {r.test_macro_f1:.4f} | "
                      f"{paper[0]:.4f} / {paper[1]:.4f} / {paper[2]:.4f} |")


if __name__ == "__main__":
    main()
