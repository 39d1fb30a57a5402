"""`make bench`: every benchmark, one table, with the machine it ran on (release build).

Runs, in order: conversion vs anndata (benches/convert_vs_anndata.py), the reader
(reader_bench), training throughput of BENCH_CONFIG at 1 and 2 CPU ranks
(benches/train_throughput.sh), embedding and layout speed (benches/eval_speed.sh) and fine-tuning
speed, then prints a Markdown table (the README's benchmark table is this output) and writes it
with the raw numbers to $CACHE/bench/summary.{md,json}.

  python benches/all.py [--gb 2] [--config configs/whb-fast.toml] [--steps 30] [--layout-cells 10000]
  python benches/all.py --table      (print the last run's table again)
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys

CACHE = os.path.join(os.environ.get("CACHE", os.path.expanduser("~/.cache/neurofm")), "bench")
BIN = "target/release"


def sh(cmd, env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        sys.exit(f"bench failed: {' '.join(cmd)} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem_kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    osname = next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME")), platform.system())
    gpu = "none"
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = ", ".join(sorted(set(p.stdout.split("\n")) - {""})) or "none"
    return f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB, {osname}, GPU: {gpu}"


def render(where, rows):
    """The Markdown table: values under 100 with one decimal, larger ones with thousands separators."""
    lines = [f"Machine: {where}", "", "| benchmark | value | unit | detail |", "|---|---|---|---|"]
    for b, v, unit, detail in rows:
        lines.append(f"| {b} | {v:.1f} | {unit} | {detail} |" if v < 100 else f"| {b} | {v:,.0f} | {unit} | {detail} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated h5ad for conversion")
    ap.add_argument("--config", default="configs/whb-fast.toml", help="training config (the default recipe)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--layout-cells", type=int, default=10000)
    ap.add_argument("--table", action="store_true", help="print the last run's table again, run nothing")
    args = ap.parse_args()
    if args.table:
        last = json.load(open(os.path.join(CACHE, "summary.json")))
        print(render(last["machine"], [(r["benchmark"], r["value"], r["unit"], r["detail"]) for r in last["rows"]]))
        return 0
    os.makedirs(CACHE, exist_ok=True)
    rows = []  # (benchmark, value, unit, detail)

    out = sh([sys.executable, "benches/convert_vs_anndata.py", "--bin", f"{BIN}/neurofm-data", "--gb", str(args.gb)])
    c = json.loads(out.strip().splitlines()[-1])
    rows += [
        ("conversion, neurofm", c["input_mb"] / c["neurofm_s"], "MB/s", f"{c['input_mb']:.0f} MB h5ad, peak RSS {c['neurofm_rss_mb']:.0f} MB"),
        ("conversion, anndata read_h5ad + write_zarr", c["input_mb"] / c["anndata_s"], "MB/s", f"peak RSS {c['anndata_rss_mb']:.0f} MB"),
        ("conversion speed-up / memory ratio vs anndata", c["anndata_s"] / c["neurofm_s"], "x faster", f"{c['anndata_rss_mb'] / c['neurofm_rss_mb']:.1f}x less peak memory"),
    ]

    out = sh(["cargo", "run", "--release", "-q", "-p", "neurofm-dataloader", "--example", "reader_bench"], env={"RAYON_NUM_THREADS": "1"})
    for label, pattern in [("reader, raw cells (read + decode), 1 worker", r"raw cells.*workers=1\s+(\d+) cells/s"),
                           ("reader, tokenized + masked (full panel), 1 worker", r"tokenized \+ masked \(FullPanel\)\s+workers=1\s+(\d+) cells/s")]:
        m = re.search(pattern, out)
        if m:
            rows.append((label, float(m.group(1)), "cells/s", "per core"))

    name = os.path.splitext(os.path.basename(args.config))[0]
    run = os.path.join(CACHE, f"run-{name}")
    for ranks in (1, 2):
        sh(["benches/train_throughput.sh", args.config, str(args.steps), "--set", 'train.precision="fp32"'], env={"BENCH_RANKS": str(ranks)})
        t = json.load(open(os.path.join(run, "throughput.json")))
        detail = f"{name}, {ranks} CPU rank{'s' if ranks > 1 else ''}, fp32"
        rows += [(f"training cells/s ({ranks} rank{'s' if ranks > 1 else ''})", t["cells_per_s"], "cells/s", detail),
                 (f"training tokens/s ({ranks} rank{'s' if ranks > 1 else ''})", t["tokens_per_s"], "tokens/s", detail),
                 (f"training MFU ({ranks} rank{'s' if ranks > 1 else ''})", 100 * t["mfu"], "%", f"of {t['peak_tflops']:.3f} TFLOP/s ({t['peak_kind']})")]
        if ranks > 1:
            rows.append(("all-reduce share of a step (2 ranks)", 100 * t["allreduce"]["share_of_step"], "%", f"{t['allreduce']['bytes_per_step'] / 1e6:.1f} MB per step, MPI"))

    out = sh(["benches/eval_speed.sh", run, str(args.layout_cells)], env={"NEUROFM_PYTHON": sys.executable})
    m = re.search(r"= ([\d.]+) cells/s on (\S+)", out)
    if m:
        rows.append(("embedding cells/s", float(m.group(1)), "cells/s", f"WHB, {m.group(2)}"))
    for method in ("Umap", "Tsne"):
        m = re.search(rf"{method} layout in ([\d.]+) s", out)
        if m:
            rows.append((f"{method.upper() if method == 'Umap' else 't-SNE'} of {args.layout_cells} cells", float(m.group(1)), "s", "64-d, 8 clusters"))

    store = os.path.join(CACHE, "whb.zarr")
    ft = os.path.join(CACHE, "finetune")
    sh([f"{BIN}/neurofm-finetune", "--pretrained", run, "--data", store, "--label-col", "subtype", "--run-dir", ft, "--force",
        "--no-progress", "--set", "train.max_steps=30", "--set", "baselines.random_forest=false"])
    f = json.load(open(os.path.join(ft, "metrics.json")))
    rate = f.get("throughput", {}).get("finetune_cells_per_s")
    if rate:
        rows.append(("fine-tune cells/s", rate, "cells/s", "WHB subtype, 1 rank"))

    where = machine()
    table = render(where, rows)
    print(table)
    with open(os.path.join(CACHE, "summary.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(CACHE, "summary.json"), "w") as fh:
        json.dump({"machine": where, "rows": [dict(zip(("benchmark", "value", "unit", "detail"), r)) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
