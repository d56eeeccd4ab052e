# The two commands of the README. Both create .venv when it is missing and re-install only
# when pyproject.toml changed (the stamp file is older than it).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.damo-installed

export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: demo test test-cluster test-jobs lint clean-storage system-deps

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/damo demo

# The web page's test drives a real headless Chromium: Debian's, since Playwright cannot download
# its own browser here. Under CI=true that test fails (never skips) without it.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then \
		SUDO=""; [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint system-deps
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest

# The whole pipeline on a two-node Ray cluster with S3 as the only shared storage (~25 min).
test-cluster: lint
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -m multinode tests/test_multinode.py

# `ray job submit` of jobs/pipeline.py against a Ray head started by `damo cluster up` (~13 min);
# also part of `make test`, this runs it alone.
test-jobs: lint
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -m jobs tests/test_jobs.py

clean-storage:
	-$(BIN)/damo storage down
	rm -rf .damo/storage
