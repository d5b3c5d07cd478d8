# make venv | run | test | test-slow. Installing is skipped while .venv/.installed is newer than the requirements.
PY := .venv/bin/python
STAMP := .venv/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: venv run test test-slow chromium

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

test: $(STAMP) chromium
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
