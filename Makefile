# driftline — the two commands are `make demo` and `make test`; both run `make setup` first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-unit bench infra-up infra-down clean

setup: $(STAMP)
	@$(BIN)/driftline infra install

# Reinstall when the package definition changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/driftline demo elec2

test: setup
	$(BIN)/pytest -q -ra --durations=30

# Every test that needs no broker or Redis: starts nothing, a couple of minutes.
test-unit: $(STAMP)
	TEST_NOTHING_STARTS=1 $(BIN)/pytest -q -ra -m "not live and not slow" -p no:cacheprovider

bench: setup
	$(BIN)/driftline bench

infra-up: setup
	$(BIN)/driftline infra up

infra-down:
	$(BIN)/driftline infra down

# The local stack's data and the reports of demos and replays; the committed benchmark results
# (reports/bench) stay.
clean:
	-$(BIN)/driftline infra down
	rm -rf .driftline reports/demo reports/replay
