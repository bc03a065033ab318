# The two commands of the README. Each prepares .venv first (scripts/setup_env.sh:
# torch, dependencies, the build; safe to rerun).
PY := .venv/bin/python

.PHONY: bench test example env clean

bench: env  ## quick benchmark at the paper's size on the best device present: table, CSV and PNG in bench_results/
	$(PY) benchmarks/bench_paper.py --quick --device auto --output bench_results $(ARGS)

test: env  ## the test suite (CUDA tests are skipped without a GPU)
	$(PY) -m pytest -q tests $(ARGS)

example: env  ## train a speaker encoder on synthetic speech (a few minutes on 2 cores): plots, metrics in example_results/
	$(PY) examples/train_speaker_encoder.py --output example_results $(ARGS)

env:
	bash scripts/setup_env.sh

clean:
	rm -rf build ge2e_ext/_C*.so *.egg-info bench_results
