# The two commands of the README.
#   make chat   set up .venv (CPU torch), pull SmolLM2-135M-Instruct, chat with it
#   make test   set up .venv with the test tools, run the whole suite
VENV ?= .venv
MODEL ?= smollm2-135m
ARGS ?=

.PHONY: chat test setup bench

setup:
	@scripts/setup.sh

chat: setup
	@$(VENV)/bin/fastserve pull $(MODEL)
	@$(VENV)/bin/fastserve chat $(MODEL) $(ARGS)

test:
	@scripts/setup.sh test
	@$(VENV)/bin/python -m pytest -q $(ARGS)

bench: setup
	@$(VENV)/bin/fastserve bench $(MODEL) --threads 2
