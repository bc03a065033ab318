"""The GE2E benchmark harness on torch.utils.benchmark, shared by the scripts in benchmarks/.
Each module imports only those before it in LAYERS (tests/test_benchmark.py checks it): common
(sizes, providers, the floor), timing (Timer or CUDA-event samples, peak memory, the busy-machine
meter), runner (check, time, measure), cli (command line, table, CSV, PNG; cli.METHOD: how)."""

import sys
from pathlib import Path

LAYERS = ("common", "timing", "runner", "cli")
sys.path.append(str(Path(__file__).resolve().parents[2]))  # a checkout built in place, too
