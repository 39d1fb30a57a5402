# neurofm: `make test` on a fresh machine installs what it needs, builds and runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CACHE       ?= $(HOME)/.cache/neurofm
PYENV       := $(CACHE)/pyenv
PY          := $(PYENV)/bin/python
# libtorch 2.11.0 for tch, from the PyPI torch wheel (CUDA 13 build; runs on CPU too).
TORCH_VENV  := $(CACHE)/torch-2.11.0
JOBS        ?= 2
SHARED_DATA ?= $(abspath ../shared/data)
APT_PACKAGES := libhdf5-dev libopenmpi-dev openmpi-bin libclang-dev clang pkg-config slurmctld slurmd slurm-client \
                libfontconfig1-dev fonts-dejavu-core
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export NEUROFM_SHARED_DATA := $(SHARED_DATA)
export NEUROFM_PYTHON := $(PY)

.PHONY: setup system-packages pyenv libtorch build test test-rust test-interop test-e2e test-slurm demo bench bench-train bench-comm bench-eval gpu-bundle clean

## setup: system packages (apt), libtorch and the Python venv for interop tests, kept outside the clone
setup: system-packages pyenv libtorch

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

pyenv: $(PYENV)/.installed

$(PYENV)/.installed: tests/interop/requirements.txt
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install -q --disable-pip-version-check -r tests/interop/requirements.txt
	cp tests/interop/requirements.txt $@

# `.libtorch` (git-ignored) points at the wheel's torch/ directory; .cargo/config.toml sets
# LIBTORCH to it, so plain `cargo build` works after `make setup`.
libtorch: $(TORCH_VENV)/.installed
	@ln -sfn "$$($(TORCH_VENV)/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .libtorch

$(TORCH_VENV)/.installed:
	python3 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --disable-pip-version-check torch==2.11.0
	touch $@

## build: release binaries in target/release
build: setup
	cargo build --release -j$(JOBS) --workspace

## test: unit + integration tests (Rust; 2-rank MPI runs included), anndata/zarr interop checks
## (Python), the real-data gate (WHB: convert → 2-rank training → eval, probe accuracy ≥ 0.95),
## then the slurm/ scripts on a real one-node SLURM cluster started on localhost
test: setup test-rust test-interop test-e2e test-slurm

test-rust:
	cargo build -j$(JOBS) --workspace --bins
	cargo test -j$(JOBS) --workspace

test-interop:
	$(PY) tests/interop/check_stores.py --bin target/debug/neurofm-data --data "$(SHARED_DATA)"
	$(PY) tests/interop/check_eval.py --bin-dir target/debug --data "$(SHARED_DATA)"
	$(PY) tests/interop/check_finetune.py --bin-dir target/debug

test-e2e:
	$(PY) tests/e2e/whb_gate.py --bin-dir target/debug --data "$(SHARED_DATA)"

# Starting slurmctld/slurmd needs root; elsewhere (a workstation) this test is skipped unless CI is set.
test-slurm:
	@if [ "$$(id -u)" = 0 ] || [ -n "$${CI:-}" ]; then tests/slurm/run.sh target/debug; \
	else echo "test-slurm: skipped (needs root to run slurmctld/slurmd)"; fi

## demo: the whole pipeline on a generated dataset (2000 cells, 4 types): convert → train →
## evaluate; open demo/eval/report.html afterwards
DEMO := demo
demo: build
	@mkdir -p $(DEMO)
	target/release/neurofm-data --quiet synth --cells 2000 --genes 200 --types 4 --seed 7 --force $(DEMO)/cells.h5ad
	target/release/neurofm-data convert -q --force $(DEMO)/cells.h5ad $(DEMO)/cells.zarr
	target/release/neurofm-train --config configs/demo.toml --data $(DEMO)/cells.zarr --run-dir $(DEMO)/run --force --no-progress
	target/release/neurofm-eval --run $(DEMO)/run --data $(DEMO)/cells.zarr --label-col cell_type --out $(DEMO)/eval
	@echo "demo: open $(DEMO)/eval/report.html"

## bench: every benchmark in one table with the machine it ran on (release build): conversion
## MB/s and peak RSS vs anndata, reader cells/s, training cells/s, tokens/s, MFU and all-reduce
## share, embedding cells/s, UMAP/t-SNE time, fine-tune cells/s (BENCH_GB sizes the conversion input)
bench: build
	$(PY) benches/all.py --gb $${BENCH_GB:-2}

## bench-train: training throughput (cells/s, tokens/s, step split, MFU) of BENCH_CONFIG on WHB;
## BENCH_RANKS=2 runs 2 CPU ranks over MPI and reports the all-reduce share
bench-train: build
	benches/train_throughput.sh $${BENCH_CONFIG:-configs/seed-hello.toml} $${BENCH_STEPS:-6}

## bench-comm: DDP gradient all-reduce (buckets, ms, GB/s) over BENCH_RANKS CPU ranks (MPI);
## on a GPU node, `neurofm-launch -- target/release/examples/allreduce_bench` measures NCCL
bench-comm: build
	cargo build --release -j$(JOBS) -p neurofm-trainer --example allreduce_bench
	target/release/neurofm-launch --backend mpi --nproc-per-node $${BENCH_RANKS:-2} -- target/release/examples/allreduce_bench

## bench-eval: embedding speed (cells/s) on WHB with BENCH_RUN's model, and UMAP / t-SNE time
## for BENCH_LAYOUT_CELLS (10,000) generated cells
bench-eval: build
	benches/eval_speed.sh $${BENCH_RUN:?set BENCH_RUN to a run directory trained on WHB} $${BENCH_LAYOUT_CELLS:-10000}

## gpu-bundle: stripped release binaries (no MPI), the libraries they need besides libtorch,
## and benches/gpu_check.sh in .gpu-bundle/ (git-ignored, at most 64 MiB): copy it to a machine
## with an NVIDIA GPU and PyTorch 2.11 and run `.gpu-bundle/gpu_check.sh` (one JSON out)
GPU_BUNDLE := .gpu-bundle
GPU_TARGET := target/gpu-bundle
gpu-bundle: setup
	CARGO_TARGET_DIR=$(GPU_TARGET) cargo build --release -j$(JOBS) -p neurofm-trainer --no-default-features --bin neurofm-train --example allreduce_bench
	CARGO_TARGET_DIR=$(GPU_TARGET) cargo build --release -j$(JOBS) -p neurofm-dataloader --bin neurofm-data
	CARGO_TARGET_DIR=$(GPU_TARGET) cargo build --release -j$(JOBS) -p neurofm-evaluation --bin neurofm-eval
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	cp $(GPU_TARGET)/release/neurofm-data $(GPU_TARGET)/release/neurofm-train $(GPU_TARGET)/release/neurofm-eval $(GPU_TARGET)/release/examples/allreduce_bench $(GPU_BUNDLE)/
	strip $(GPU_BUNDLE)/neurofm-* $(GPU_BUNDLE)/allreduce_bench
	benches/bundle_libs.sh $(GPU_BUNDLE)
	cp benches/gpu_check.sh benches/torch_reference.py configs/single-gpu.toml $(GPU_BUNDLE)/
	@size=$$(du -sm $(GPU_BUNDLE) | cut -f1); echo "$(GPU_BUNDLE): $$size MiB"; \
	if [ $$size -gt 64 ]; then echo "gpu-bundle: over 64 MiB" >&2; exit 1; fi

clean:
	cargo clean
