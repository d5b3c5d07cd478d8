# make venv | run | test | test-slow. Installing is skipped while .venv/.installed is newer than the requirements.
PY := .venv/bin/python
STAMP := .venv/.installed
CHROMIUM := /usr/bin/chromium
JS := tests/js

.PHONY: venv run test test-slow chromium node

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

run: $(STAMP)
	$(PY) app.py

# Debian's Chromium for the browser tests (playwright's own browser downloads are never used), installed when run as
# root. Without it `make test` stops here: the browser tests are never skipped.
chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium; \
	fi
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "$(CHROMIUM) is missing and the browser tests need it: run 'make chromium' as root," \
			"or 'apt-get install -y --no-install-recommends chromium'" >&2; \
		exit 1; \
	fi

# Node 20+ and @gradio/client (pinned in $(JS)/package-lock.json) for the README's JavaScript example, which
# tests/test_embed.py runs. Without Node `make test` stops here: that test is never skipped.
node: $(JS)/node_modules/.installed

$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	@if ! command -v node >/dev/null || [ "$$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then \
		echo "Node 20 or newer is missing and the JavaScript example's test needs it: install it" \
			"from https://nodejs.org/en/download (Debian 13's 'apt-get install -y nodejs npm' is Node 20)" >&2; \
		exit 1; \
	fi
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

test: $(STAMP) chromium node
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
