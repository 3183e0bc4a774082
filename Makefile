# vmpower: every target installs what it needs first (system packages, then .venv).
# The stamp depends on pyproject.toml, so a second run does no install work.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vmpower-installed
PYTEST_ARGS ?=

.PHONY: all deps test run bench lint clean help completions guest-pyz

help:
	@echo "make run    - demo: vmpowerd on libvirt's test driver + simulated cpufreq, with guest traffic"
	@echo "make test   - install what is missing, then run the whole test suite"
	@echo "make bench  - benchmarks; JSON results under bench/results/"
	@echo "make lint   - ruff"
	@echo "make guest-pyz - build/vmpower-guest.pyz: the guest tool for any python3 >= 3.9"

deps: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	bash scripts/ensure-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is our failure, never a pass.
test: deps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit $$rc

run: deps
	$(PY) -m vmpower.demo

# The guest tool as one standard-library-only zipapp (no install, no libvirt): copy it
# into a guest and run `python3 vmpower-guest.pyz --help`. Needs only python3.
guest-pyz:
	$(PYTHON) scripts/build_guest_pyz.py build/vmpower-guest.pyz

# The scale, state and hostile benches run a real libvirtd, and the guest bench a QEMU
# guest: the e2e set-up's packages (a no-op once they are there).
bench: deps
	bash scripts/ensure-e2e-deps.sh
	$(PY) -m bench

lint: deps
	$(VENV)/bin/ruff check vmpower tests bench
	$(VENV)/bin/ruff format --check vmpower tests bench

clean:
	rm -rf $(VENV) bench/results bench/build build .pytest_cache .ruff_cache

# Shell completion files shipped with the package, generated from vmpower's parser.
completions: deps
	$(VENV)/bin/vmpower completion bash > share/bash-completion/completions/vmpower
	$(VENV)/bin/vmpower completion zsh > share/zsh/site-functions/_vmpower
