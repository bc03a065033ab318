# The two commands of the README. Each prepares .venv first (scripts/setup_env.sh:
# torch, dependencies, the build; safe to rerun).
PY := .venv/bin/python

.PHONY: bench test env clean

bench: env  ## quick benchmark on the best device present: table, CSV and PNG in bench_results/
	$(PY) benchmarks/bench_ge2e.py --quick --device auto --output bench_results $(ARGS)

test: env  ## the test suite (CUDA tests are skipped without a GPU)
	$(PY) -m pytest -q tests $(ARGS)

env:
	bash scripts/setup_env.sh

clean:
	rm -rf build ge2e_ext/_C*.so *.egg-info bench_results
