# Two commands for a fresh machine (README): `make demo` and `make test`.
# torch is installed first with an exact pin: any other torch requirement makes pip
# pull the CUDA build (gigabytes); with torch==2.13.0 present, the project's range
# installs nothing more.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup protos bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedcollab simulate

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff and mypy, as .ci/run runs them (configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python protos/generate.py

bench: $(STAMP)
	$(BIN)/python benchmarks/round_overhead.py
	$(BIN)/python benchmarks/dp_overhead.py
	$(BIN)/python benchmarks/secagg_overhead.py

# Coverage-guided fuzzing of the coordinator's request handling (fuzz/README.md), in
# one process; crash reproducers land in fuzz/. `make fuzz FUZZ_SECONDS=600`.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[fuzz]"
	mkdir -p fuzz/corpus
	$(BIN)/python fuzz/fuzz_coordinator.py -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/ -print_final_stats=1 fuzz/corpus fuzz/seeds

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
