# imcap: train, evaluate and use CNN→RNN image captioning models.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install.stamp

.DEFAULT_GOAL := help
.PHONY: help install train demo test test-slow test-all lint format clean clean-cache bench bench-data recipe ship-model

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,demo,cluster]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install imcap with its dev tools and the web demo

train: $(STAMP) ## train on the built-in synthetic dataset (pass ARGS="encoder=resnet50 ...")
	$(PY) src/train.py $(ARGS)

demo: $(STAMP) ## web demo + JSON API on http://127.0.0.1:8000 (CKPT=<.ckpt or model name>; default: the shipped model)
	$(PY) src/serve.py $(if $(CKPT),ckpt_path=$(CKPT)) $(ARGS)

test: $(STAMP) ## fast test tier (< 15 min on 2 CPU cores)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP) ## slow tier: real data, longer training
	$(PY) -m pytest -m "slow" -q

test-all: $(STAMP) ## every test
	$(PY) -m pytest -q

lint: $(STAMP) ## ruff check + format check
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format: $(STAMP) ## ruff fix + format
	$(PY) -m ruff check --fix src tests bench
	$(PY) -m ruff format src tests bench

bench: $(STAMP) ## speed benchmarks (JSON in bench/results/)
	$(PY) bench/speed.py $(ARGS)

bench-data: $(STAMP) ## Flickr8k two-step benchmark: extraction, epochs, val scores (JSON)
	$(PY) bench/flickr8k.py $(ARGS)

DATA ?= ../shared/data/flickr8k
recipe: $(STAMP) ## the best Flickr8k recipe end to end (DATA=<flickr8k root>): extraction, CE, SCST, beam-3 val table
	$(PY) -m pip install -q -e ".[weights]"
	$(PY) bench/recipe.py --data-root $(DATA) $(ARGS)

ship-model: $(STAMP) ## pack CKPT=<best .ckpt of make recipe> as the shipped model (src/imcap/zoo), scored on DATA's val
	$(PY) bench/ship_model.py --ckpt $(CKPT) --data-root $(DATA) --card bench/model_card_flickr8k.json $(ARGS)

clean: ## remove run outputs and tool caches; keeps .venv, data/ and the feature caches
	@echo "removing outputs/ lightning_logs/ wandb/ and tool caches; keeping .venv, data/ and $(CACHE)/ (make clean-cache)"
	rm -rf outputs .pytest_cache .ruff_cache lightning_logs wandb
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

CACHE ?= $(or $(IMCAP_CACHE_DIR),.cache)
clean-cache: ## remove the feature caches (GBs; re-extracted on the next two-step run)
	@du -sh $(CACHE)/features 2>/dev/null || echo "no feature cache in $(CACHE)/features"
	rm -rf $(CACHE)/features
