"""The GE2E benchmark harness on torch.utils.benchmark, shared by the scripts in benchmarks/.

Each module imports only those before it in LAYERS (tests/test_benchmark.py checks it):
common (sizes, modes, statuses, the providers, inputs and the floor), timing (interleaved
samples by Timer or CUDA events, peak memory, the busy-machine meter), runner (the
correctness check, then timing, then memory), report (table, summary, CSV, PNG), cli.
"""

import sys
from pathlib import Path

LAYERS = ("common", "timing", "runner", "report", "cli")
# A checkout that was built in place but not pip-installed still imports ge2e_ext.
if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[2]))
