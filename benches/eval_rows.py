"""Shared by the bench scripts that tabulate `neurofm-eval` results (recipe.sh, corpus.sh)."""
import os


def rep(metrics, prefix):
    """The representation of `metrics.json` whose name starts with `prefix`."""
    return next(r for r in metrics["representations"] if r["name"].startswith(prefix))


def append(tsv, cols, row):
    """Appends `row` to `tsv` (writing the header `cols` first for a new file) and prints it."""
    new = not os.path.exists(tsv)
    with open(tsv, "a") as f:
        if new:
            f.write("\t".join(cols) + "\n")
        f.write("\t".join(row) + "\n")
    print("\t".join(f"{c}={v}" for c, v in zip(cols, row)))
