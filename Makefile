# Two commands set up and run everything on a fresh machine:
#   make run    create .venv, install, run the whole pipeline (dvc repro) on the simulated atlas
#   make test   the test suite, in the same .venv (it builds the documentation site too)
#   make docs   the documentation site into site/ (make docs-serve: on 127.0.0.1:8000)
# PROFILE=quick selects params-quick.yaml for a smoke run.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# dvc stages and MLproject entry points call `cellcontrast`: the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run quick test install lint bench-venv clean docs docs-serve

$(STAMP): pyproject.toml
	@# A full disk otherwise shows up as a pip OSError or a truncated torch file, far from its cause.
	@test -x $(BIN)/python || { free=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$free" -lt 3145728 ]; then echo "make: the install needs about 3 GB free; this disk has $$((free / 1024)) MB" >&2; exit 1; fi; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU wheel; a looser spec would pull a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	@# what `make run` needs; `make test` adds the test and site tools (TEST_STAMP)
	$(BIN)/pip install -q -e ".[train,pipeline,majority]" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, cellcontrast, mlflow, optuna, onnxruntime, dvc, igraph, pynndescent, distributed"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[train,pipeline,dev,majority,docs]" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import pytest, importlinter, mkdocs, mkdocstrings, pgserver"
	touch $(TEST_STAMP)

install: $(STAMP)

run: $(STAMP)
ifeq ($(PROFILE),quick)
	@mkdir -p quick && rm -f quick/stage_times.csv
	time env CELLCONTRAST_STAGE_TIMES=quick/stage_times.csv $(MAKE) --no-print-directory quick
	@$(BIN)/python -m cellcontrast.cli.stage_times quick/stage_times.csv
else
	@test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false
	@# every cellcontrast command appends its wall time; the table prints at the end
	@mkdir -p reports && rm -f reports/stage_times.csv
	time env CELLCONTRAST_STAGE_TIMES=reports/stage_times.csv $(BIN)/dvc repro
	@test ! -f reports/stage_times.csv || $(BIN)/python -m cellcontrast.cli.stage_times reports/stage_times.csv
endif

# PROFILE=quick: the same steps on a small atlas, outside DVC (outputs under quick/).
Q := params-quick.yaml
quick: $(STAMP)
	cellcontrast simulate --out quick/atlas.h5ad --cells 12000 --types 30 --genes 400 --individuals 2
	for s in default scarce; do for seed in 0 1; do \
	  cellcontrast split --params $(Q) --atlas quick/atlas.h5ad --setting $$s --seed $$seed --out-dir quick/splits/$$s/seed$$seed || exit 1; \
	done; done
	for s in default scarce; do \
	  cellcontrast split --params $(Q) --atlas quick/atlas.h5ad --setting $$s --tuning --out-dir quick/splits/$$s/tuning || exit 1; \
	  cellcontrast tune-setting --params $(Q) --setting $$s || exit 1; \
	done
	cellcontrast grid --params $(Q)
	cellcontrast report --params $(Q)
	cellcontrast export --best --experiment cellcontrast-quick --setting default --seed 0 --out quick/annotator.onnx
	cellcontrast holdout --atlas quick/atlas.h5ad --split-dir quick/splits/default/seed0 --out quick/query.h5ad --max-cells 5000
	cellcontrast annotate quick/annotator.onnx quick/query.h5ad --out quick/query_annotated.h5ad --csv quick/query_annotated.csv --label-key cell_type --min-confidence 0.5

test: $(TEST_STAMP)
	@# The layer contracts of pyproject.toml: a wrong import arrow fails here.
	$(BIN)/lint-imports --no-cache
	@# A worker per core (pytest-xdist). tests/docs builds the site once with --strict (the
	@# tutorials execute), in one worker while the others run the rest, and checks what it built.
	$(BIN)/python -m pytest -p no:cacheprovider -n auto --dist loadgroup

# The documentation site (mkdocs.yml): --strict fails on a broken link or reference, and any
# other warning fails too. docs-serve rebuilds on change, on 127.0.0.1 only.
export NO_MKDOCS_2_WARNING := 1
docs: $(TEST_STAMP)
	set -o pipefail; $(BIN)/mkdocs build --strict --site-dir site 2>&1 | tee .docs-build.log
	@# mkdocs's warnings start the line; a kernel's "[IPKernelApp] WARNING" (local TCP) is not one
	@! grep -n '^WARNING' .docs-build.log

docs-serve: $(TEST_STAMP)
	CELLCONTRAST_DOCS_CACHE=true $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# Peers (CellTypist 1.7.1 cannot train with scikit-learn >= 1.8; scANVI) live in their own venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q "celltypist==1.7.1" "scikit-learn==1.7.2" anndata scanpy 2>&1 | grep -v "is ignored" || true
	@# scANVI for bench/heldout_user_path.py; torch pinned to the CPU wheel as in the project's venv
	$(BENCH_VENV)/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(BENCH_VENV)/bin/pip install -q "scvi-tools==1.4.2" "torch==2.13.0" "scikit-learn==1.7.2" 2>&1 | grep -v "is ignored" || true
	$(BENCH_VENV)/bin/python -c "import celltypist, sklearn, scvi; assert sklearn.__version__ == '1.7.2'"
	touch $@

bench-venv: $(BENCH_VENV)/.installed

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf data models reports quick mlruns mlflow.db optuna.db site .docs-build.log
