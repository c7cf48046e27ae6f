# Two commands for a new user: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 is a quick local CPU install on the reference machine; on a cluster pass e.g.
#   make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format docs bench clean clean-superseded serve serve-postgres stop status slurm-up slurm-down mark-crashed serve-process screenshots

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install whenever the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/monolm run --preset tiny --seeds 42
	@echo "monolm and prefect are in $(VENV)/bin: 'source $(VENV)/bin/activate' puts them on PATH"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that start services, SLURM or PostgreSQL, or inject faults (about 5
# minutes on a 2-core machine; the README gives the measured times).
test-fast: install
	$(PY) -m pytest -m "not service and not slurm and not postgres and not resilience" $(PYTEST_ARGS)

# ruff lint (pyflakes, pycodestyle, isort, bugbear, pyupgrade, simplify, complexity), format check,
# and the documentation site's strict build (a broken link or anchor fails).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The documentation site (mkdocs.yml, docs/) served with live reload on http://127.0.0.1:8000.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Apply ruff's safe fixes and format the tree.
format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Screenshots of a deployed tiny run in Prefect's UI, taken by the browser test (headless Chromium,
# installed with apt if missing): flow run, stage task runs, progress artifacts, report and figures.
SCREENSHOTS ?= .state/screenshots
screenshots: install
	MONOLM_SCREENSHOTS="$(abspath $(SCREENSHOTS))" $(PY) -m pytest -m browser -q -s tests/test_service.py
	@echo "screenshots in $(abspath $(SCREENSHOTS))"

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/attacks.py

SERVE_ARGS ?=
# Prefect server (SQLite) + work pool `local` + `prefect deploy --all` + worker; prints the UI address.
# The nightly schedule (quick preset: downloads Pythia-1.4B) is deployed inactive unless MONOLM_NIGHTLY=on.
serve: install
	infra/serve.sh up $(SERVE_ARGS)

# The same with PostgreSQL (Debian's postgresql, cluster under .state/postgres, installed if missing).
serve-postgres: install
	infra/serve.sh up --db postgres $(SERVE_ARGS)

# Stop exactly what `make serve` started (recorded PIDs), in reverse order.
stop:
	infra/serve.sh down

# Is the service up, and the latest experiment runs with their state in full (`monolm runs`).
status: install
	-@infra/serve.sh status
	@$(PY) -m flows.cli runs

# Mark flow runs whose process died (stuck Running after a worker or machine crash) as Crashed.
mark-crashed: install
	PREFECT_API_URL=$$(infra/server/prefect-server.sh url) $(PY) -m deployments.crashed

# All deployments served from one process (instead of a worker); needs a running server.
serve-process: install
	PREFECT_API_URL=$$(infra/server/prefect-server.sh url) $(PY) -m deployments.serve --replace

SLURM_ARGS ?= --cpus 2 --gpus 2
# A one-node SLURM on this machine with fake A100s (daemons on all interfaces, munge-authenticated);
# then: eval "$$(infra/slurm/local-slurm.sh env)"; `make slurm-down` stops it.
slurm-up:
	infra/slurm/local-slurm.sh start $(SLURM_ARGS)

slurm-down:
	infra/slurm/local-slurm.sh stop

# Superseded stage results (kept when a config change replaced them, reused if it changes back):
# listed only; `make clean-superseded CLEAN_ARGS=--yes` removes them.
CLEAN_ARGS ?=
clean-superseded: install
	$(VENV)/bin/monolm clean $(CLEAN_ARGS)

# Stops services first: deleting .state under a running PostgreSQL would corrupt it.
clean:
	-infra/serve.sh down
	-infra/slurm/local-slurm.sh stop
	-infra/postgres/postgres.sh stop
	rm -rf runs results .state
