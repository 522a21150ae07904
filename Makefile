# Entry points. `make test` and `make bench` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# pytest arguments, e.g. `make test PYTEST_ARGS="-k vocab -x"`
PYTEST_ARGS ?=

.PHONY: setup test lint bench demo launch-venv clean-venv lock

setup: $(STAMP)

# Re-run the installer when what it installs changes. It installs exactly a lock in
# locks/ (e.g. `VENV=/tmp/v make setup` builds a fresh environment from it).
$(STAMP): pyproject.toml tools/setup_env.sh $(wildcard locks/*.txt)
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	@touch $@

# Regenerate locks/ from pyproject.toml (`make lock UPGRADE=1` moves every version;
# docs/environment.md).
lock:
	UPGRADE=$(UPGRADE) bash tools/lock.sh

lint: setup
	$(PY) -m ruff check megatron_lpreg tests bench tools launch

# Test files run in parallel (two workers); the tests of one file stay together
# because they share module-scoped multi-rank runs. The 25 slowest are listed at the end:
# CI has 40 minutes on two cores (docs/testing.md); `multinode` tests run in test-multinode.
test: setup lint
	@$(MAKE) --no-print-directory launch-venv || echo "[test] no nemo-run environment: the Slurm test uses plain sbatch"
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

# Each benchmark prints one JSON document; bench/results/ holds measured runs.
bench: setup
	$(PY) bench/vocab_parallel.py
	$(PY) bench/convert.py
	$(PY) bench/weight_sync.py
	$(PY) bench/fused_output.py
	$(PY) bench/checkpoint_manifest.py

# The tiny end-to-end Lp-Reg run (a fresh one each time: the previous demo run is replaced).
DEMO_OUT ?= runs/tiny_cpu
DEMO_METRICS := reward/mean reward/accuracy actor/entropy sparks/p_lt_0.1 sparks/p_lt_0.01 \
	actor/lp_reg/regularised_share response/length_mean
demo: setup
	$(PY) tools/make_tiny_task.py --out runs/tiny_task
	@if [ -d $(DEMO_OUT) ]; then echo "[demo] replacing the previous demo run in $(DEMO_OUT)"; rm -rf $(DEMO_OUT); fi
	$(PY) -m megatron_lpreg.train --config examples/tiny_cpu.yaml train.out_dir=$(DEMO_OUT)
	$(PY) tools/plot_run.py $(DEMO_OUT) --out $(DEMO_OUT)/curves.png --summary --metrics $(DEMO_METRICS)

# The demo, then its numbers as the golden file (docs/results/demo_tiny_cpu.jsonl, which
# `pytest -k golden` compares the demo's first steps with), the README's demo table and
# docs/figures/demo_tiny_cpu.png, all from that one run. Run it when a change moves them.
.PHONY: demo-golden
demo-golden: demo
	$(PY) tools/demo_golden.py $(DEMO_OUT)

# The launcher's own environment: nemo-run pins packages that clash with vLLM's, and the
# launcher needs nothing else (`.venv-launch/bin/python -m launch ...`).
launch-venv: .venv-launch/.stamp
.venv-launch/.stamp: $(wildcard locks/launch-*.txt)
	$(PYTHON) -m venv .venv-launch
	.venv-launch/bin/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps \
		-r locks/launch-py$$(.venv-launch/bin/python -c 'import sys; print("%d%d" % sys.version_info[:2])').txt
	@touch $@

# Mutation testing of the core with cosmic-ray, in a copy of the tree (docs/testing.md);
# not part of `make test`: about 30 minutes on 2 cores. E.g. MUTATE_ARGS="--only loss".
MUTATE_ARGS ?=
.PHONY: mutate
mutate: setup
	$(PY) tools/mutation/run.py $(MUTATE_ARGS)

# The launch cases that do not fit CI's time (docs/launch.md; the `multinode` marker): the
# two-node requeue, bit-identical to an uninterrupted two-node run, the restart limit and
# the hang watchdog, with the two-node and restart tests CI runs too. Root, a real Slurm
# (installed when missing) and network namespaces.
.PHONY: test-multinode
test-multinode: setup
	@$(MAKE) --no-print-directory launch-venv || echo "[test] no nemo-run environment: the Slurm tests use plain sbatch"
	LPREG_MULTINODE=1 $(PY) -m pytest -n 2 --dist loadfile tests/launch/test_two_node.py tests/launch/test_slurm.py \
		tests/trainer/test_hang_watchdog.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
