# fsl_med: every target installs into .venv first if needed.
#   make demo | make test | make train-mri DATA=... ARGS="k=v ..." | make eval-mri CKPT=...
# Variables: DATA (data.root), CKPT (ckpt: a path, or 'latest' = newest last.ckpt of the config's runs),
#            ARGS (extra key=value config overrides), SRC (official download for prepare-*), OUT (prepare-*
#            output folder), CONFIG (experiments/ config of `make ablations` or `make compare`), PYTHON_BOOT
#            (python used to create .venv). `make gpu-check` needs no .venv on a GPU machine that has the bundle
#            (gpu_bundle/).
PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
FSL         := $(VENV)/bin/fsl-med
STAMP       := $(VENV)/.fsl_med-installed
DATA        ?=
CKPT        ?= latest
ARGS        ?=
SRC         ?=
OUT         ?=
MRI_OUT      = $(or $(OUT),data/CHAOST2/chaos_MR_T2_normalized)
CT_OUT       = $(or $(OUT),data/SABS/sabs_CT_normalized)
NEED_SRC     = $(if $(SRC),,$(error SRC= is required: the official download (zip or folder)))
DATA_ARG     = $(if $(DATA),data.root=$(DATA),)

.PHONY: install test test-deps test-fast docs docs-serve demo bench gpu-check gpu-bundle slurm-start slurm-stop ablations compare sweep-mri sweep-ct download-mri prepare-mri prepare-ct train-mri eval-mri train-ct eval-ct lint clean-venv help

help: ## list the targets with one line each
	@grep -E '^[a-z -]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install fsl_med with its dev tools (idempotent)

test: $(STAMP) lint docs test-deps ## lint + import contracts, the strict docs build, then the test suite (real CHAOS data from $FSL_MED_DATA_MRI when set; required under CI=true)
	$(PY) -m pytest -q

test-deps: ## as root: capsh (Debian libcap2-bin), which the permission tests use to drop root's file-access override
	@if [ "$$(id -u)" = 0 ] && ! command -v capsh >/dev/null 2>&1; then \
		echo "installing capsh (libcap2-bin) for the permission tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcap2-bin >/dev/null; fi

test-fast: $(STAMP) ## the test suite without the slow end-to-end tests
	FSL_MED_FAST=1 $(PY) -m pytest -q -m "not slow"

docs: $(STAMP) ## build the documentation site strictly (a broken link, a page missing from the nav or a docstring that does not parse fails) -> site/
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(STAMP) ## serve the documentation site at http://127.0.0.1:8000, rebuilt on every edit
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

demo: $(STAMP) ## phantom data, tiny random-init model: Dice before/after a short training, a few minutes on CPU
	$(FSL) demo experiments/demo.yaml $(ARGS)

download-mri: $(STAMP) ## download CHAOS_Train_Sets.zip (resumable, SHA-256 checked) into OUT (default data/downloads)
	$(FSL) download chaos --out $(or $(OUT),data/downloads)

prepare-mri: $(STAMP) ## SRC=CHAOS_Train_Sets.zip or its folder -> OUT (default data/CHAOST2/chaos_MR_T2_normalized)
	$(NEED_SRC)$(FSL) prepare chaos --src $(SRC) --out $(MRI_OUT)

prepare-ct: $(STAMP) ## SRC=Synapse RawData/Training folder or zip -> OUT (default data/SABS/sabs_CT_normalized)
	$(NEED_SRC)$(FSL) prepare sabs --src $(SRC) --out $(CT_OUT)

train-mri: $(STAMP) ## train on prepared CHAOS-T2 (DATA=folder, default $FSL_MED_DATA_MRI or data/CHAOST2/chaos_MR_T2_normalized, what prepare-mri writes)
	$(FSL) train experiments/mri.yaml $(DATA_ARG) $(ARGS)

eval-mri: $(STAMP) ## evaluate CKPT (default: latest mri run) on CHAOS-T2 fold queries
	$(FSL) eval experiments/mri.yaml $(DATA_ARG) ckpt=$(CKPT) $(ARGS)

train-ct: $(STAMP) ## train on prepared SABS CT (DATA=folder, default data/SABS/sabs_CT_normalized)
	$(FSL) train experiments/ct.yaml $(DATA_ARG) $(ARGS)

eval-ct: $(STAMP) ## evaluate CKPT (default: latest ct run) on SABS fold queries
	$(FSL) eval experiments/ct.yaml $(DATA_ARG) ckpt=$(CKPT) $(ARGS)

sweep-mri sweep-ct: $(STAMP) ## W&B sweep from experiments/sweeps/{mri,ct}.yaml: create it and start an agent (needs `wandb login`)
	$(FSL) sweep experiments/sweeps/$(@:sweep-%=%).yaml

ablations: $(STAMP) ## ablation grid + report (CONFIG=ablation_cpu: CPU budget on real CHAOS-T2; CONFIG=ablation for GPUs) -> lightning_logs/<name>-ablation/
	$(FSL) ablate $(or $(CONFIG),ablation_cpu) $(DATA_ARG) $(ARGS)

compare: $(STAMP) ## heads x encoders through the protocol, one report (CONFIG=compare_cpu: CPU budget on real CHAOS-T2, ~30 min on 2 cores) -> lightning_logs/<name>-compare/
	$(FSL) compare $(or $(CONFIG),compare_cpu) $(DATA_ARG) $(ARGS)

bench: $(STAMP) ## speed, memory and FLOP-bound figures -> BENCHMARKS.md + benchmarks.json (DATA=prepared CHAOS-T2, default $FSL_MED_DATA_MRI or data/CHAOST2/chaos_MR_T2_normalized)
	$(FSL) bench $(if $(DATA),--data $(DATA),) $(ARGS)

gpu-check: ## the GPU path run and measured (tiny CPU mode without CUDA) [DATA=...] -> OUT (default lightning_logs/gpu-check/)
	@OUT="$(or $(OUT),lightning_logs/gpu-check)" bash scripts/gpu-check.sh $(if $(DATA),--data $(DATA),) $(ARGS)

gpu-bundle: $(STAMP) ## wheels (Python 3.12) + a real CHAOS-T2 subset with superpixels for a GPU machine -> gpu_bundle/
	$(FSL) gpu-bundle --out $(or $(OUT),gpu_bundle) $(if $(DATA),--data $(DATA),)

slurm-start: ## as root: a local single-node SLURM for the launcher tests (apt installs it if missing; idempotent)
	bash scripts/slurm-local.sh start

slurm-stop: ## stop the local SLURM daemons that `make slurm-start` started
	bash scripts/slurm-local.sh stop

lint: $(STAMP) ## ruff over fsl_med/ and tests/, and the import contracts of pyproject.toml (layers, no cycles)
	$(VENV)/bin/ruff check fsl_med tests
	$(VENV)/bin/lint-imports

clean-venv: ## remove .venv
	rm -rf $(VENV)
