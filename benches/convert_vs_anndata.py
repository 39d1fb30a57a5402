"""Conversion benchmark: `neurofm-data convert` vs `anndata.read_h5ad(f).write_zarr(out)`
on the same synthetic h5ad (CSR, gzip) of at least --gb gigabytes. Prints seconds, MB/s of
input and peak RSS side by side, and the ratios.

    python benches/convert_vs_anndata.py --bin target/release/neurofm-data --gb 2
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

CACHE = os.path.expanduser("~/.cache/neurofm/bench")

ANNDATA = """
import sys, warnings, anndata as ad
warnings.filterwarnings("ignore")
ad.settings.zarr_write_format = 3
ad.read_h5ad(sys.argv[1]).write_zarr(sys.argv[2])
"""


def run_timed(cmd):
    """Runs cmd under GNU time; returns (seconds, peak RSS in MB)."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stderr}")
    rss_kb = int(p.stderr.strip().splitlines()[-1])
    return secs, rss_kb / 1024


def dir_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def synth(binary, gb):
    """A cached synthetic h5ad of at least `gb` GB (size estimated from a pilot file)."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"synth-{gb}gb.h5ad")
    if os.path.exists(path):
        return path
    pilot = os.path.join(CACHE, "pilot.h5ad")
    subprocess.run([binary, "synth", pilot, "--cells", "20000", "--genes", "2000", "--force"], check=True, capture_output=True)
    per_cell = os.path.getsize(pilot) / 20000
    os.remove(pilot)
    cells = int(gb * 1e9 / per_cell * 1.03)
    print(f"synthesizing {cells} cells × 2000 genes (≈{gb} GB) into {path} ...", flush=True)
    subprocess.run([binary, "synth", path, "--cells", str(cells), "--genes", "2000", "--types", "8", "--force"], check=True)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--gb", type=float, default=2.0)
    args = ap.parse_args()
    binary = os.path.abspath(args.bin)
    src = synth(binary, args.gb)
    in_mb = os.path.getsize(src) / 1e6
    work = os.path.join(CACHE, "out")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    rows = []
    for name, cmd, out in [
        ("neurofm-data convert", [binary, "convert", "-q", src, os.path.join(work, "neurofm.zarr")], "neurofm.zarr"),
        ("anndata read_h5ad+write_zarr", [sys.executable, "-c", ANNDATA, src, os.path.join(work, "anndata.zarr")], "anndata.zarr"),
    ]:
        secs, rss = run_timed(cmd)
        rows.append((name, secs, in_mb / secs, rss, dir_mb(os.path.join(work, out))))
        print(f"{name:<30} {secs:8.1f} s  {in_mb / secs:8.1f} MB/s  peak RSS {rss:8.0f} MB  output {rows[-1][4]:8.0f} MB", flush=True)
    (_, t_n, _, r_n, _), (_, t_a, _, r_a, _) = rows
    print(f"input {in_mb:.0f} MB; neurofm is {t_a / t_n:.2f}x faster than anndata with {r_a / r_n:.1f}x less peak memory")
    print(json.dumps({"input_mb": in_mb, "neurofm_s": t_n, "anndata_s": t_a, "neurofm_rss_mb": r_n, "anndata_rss_mb": r_a}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
