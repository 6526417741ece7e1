# dsv3_ref: `make run` executes every notebook, `make test` runs all tests (what CI runs via .ci/run).
PY ?= python3
VENV ?= .venv

BIN := $(VENV)/bin
STAMP := $(VENV)/.dsv3_ref-installed
# teaching order: notebooks/NN_*.ipynb, then each sub-folder (notebooks/exercises/...)
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb)) $(sort $(wildcard notebooks/*/*.ipynb))
LINT_PATHS := $(wildcard dsv3_ref tests benchmarks scripts classroom)

.PHONY: help venv test test-portable lab run notebooks lint book student instructor slides clean

help:
	@echo "make run    set up $(VENV) and execute every notebook in place (alias: make notebooks)"
	@echo "make lab    set up $(VENV) and open the notebooks in JupyterLab"
	@echo "make test   set up $(VENV) and run the unit tests and the notebook checks (nbval)"
	@echo "make test-portable  the same under another numeric environment, as on another machine (CI runs both)"
	@echo "make lint   ruff check (style, imports, complexity)"
	@echo "make book   build the book offline into book/_build/html (needs npm once, for MathJax)"
	@echo "make student     the student edition in build/student: notebooks without solutions (executed), book, zip"
	@echo "make instructor  the instructor edition: the book with solutions (make book) and the slides"
	@echo "make slides      one reveal.js deck per lesson in build/slides (offline; needs npm once, for reveal.js)"
	@echo "make clean  remove build outputs and caches (keeps $(VENV))"

venv: $(STAMP)

# torch first, pinned by constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[dev,hf,notebooks,book]'
	touch $@

# nbval checks the notebooks pinned to one thread JOBS at a time (pytest-xdist, one notebook per worker, slowest
# first), then the others one at a time: a notebook pinning two threads beside another oversubscribes the cores (its
# OpenMP threads spin-wait). scripts/nbval_schedule.py makes the two lists from each notebook's set_num_threads.
NBVAL := -m pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider
NB_PARALLEL = $(shell $(PY) scripts/nbval_schedule.py parallel)
NB_SERIAL = $(shell $(PY) scripts/nbval_schedule.py serial)
NBVAL_PARALLEL = $(NBVAL) -n $(JOBS) --dist loadfile --no-loadscope-reorder $(NB_PARALLEL)
# pytest-xdist workers (`make test JOBS=1` on one core): the one-thread notebooks, the perturbed unit tests
JOBS ?= 2

test: venv
	$(BIN)/python -m pytest tests
ifneq ($(NOTEBOOKS),)
	$(BIN)/python $(NBVAL_PARALLEL)
	$(BIN)/python $(NBVAL) $(NB_SERIAL)
else
	@echo "no notebooks/*.ipynb yet: skipping the nbval step"
endif

# The different-machine pass: the unit tests and the notebooks again, with the last bits of every float computation
# changed the way another CPU changes them (scripts/perturbed_env.py: one ATen CPU capability below this machine's,
# MKL_CBWR=COMPATIBLE, another thread count). A stored output or an exact comparison that holds only on the machine
# that made it fails here. Reproducible on its own: `env $$(.venv/bin/python scripts/perturbed_env.py) <command>`.
# The unit tests run JOBS at a time here: with one thread each (the perturbed thread count on a multi-core machine)
# they would leave the other cores idle. Tests marked no_numerics (the book's and the slides' builds, the browser checks:
# no floating-point result) run in `make test` only.
test-portable: venv
	@echo "different-machine pass: $$($(BIN)/python scripts/perturbed_env.py)"
	env $$($(BIN)/python scripts/perturbed_env.py) $(BIN)/python -m pytest tests -p no:cacheprovider -n $(JOBS) \
		-m "not no_numerics"
ifneq ($(NOTEBOOKS),)
	env $$($(BIN)/python scripts/perturbed_env.py) $(BIN)/python $(NBVAL_PARALLEL)
	env $$($(BIN)/python scripts/perturbed_env.py) $(BIN)/python $(NBVAL) $(NB_SERIAL)
endif

lab: venv
	$(BIN)/jupyter lab notebooks

# Executes the notebooks in teaching order (NN_ prefix) and stores their outputs, which nbval then checks.
# The repository's notebooks are the instructor edition (solutions plugged in); `make student` builds the other one.
run: venv
ifneq ($(NOTEBOOKS),)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 \
		--NotebookClient.record_timing=False $(NOTEBOOKS)
else
	@echo "no notebooks/*.ipynb yet: nothing to run"
endif

notebooks: run

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)

# Builds the book offline from the stored notebooks into book/_build/html (MathJax: npm pack mathjax@3, cached).
book: venv
	$(BIN)/python -m book.build

# The student edition (classroom/editions.py): every notebook without its solution cells, executed (~6 min), its book,
# and the hand-out zip. The instructor edition is the repository's notebooks: `make book` and `make slides`.
student: venv
	$(BIN)/python -m classroom.editions

instructor: book slides

# One deck per lesson of classroom/lessons.yml (the instructor guide's lesson plans), from the student edition.
slides: venv
	$(BIN)/python -m classroom.slides

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache book/_build
	find $(wildcard dsv3_ref tests notebooks benchmarks book) -type d \
		\( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +
