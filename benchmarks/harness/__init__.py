"""The GE2E benchmark harness: one module per concern, shared by the scripts in benchmarks/.

    common     sizes, modes, statuses, progress lines, number format
    providers  the ways of computing the loss (and the matrix-product floor), their inputs
    guard      the correctness check every provider passes before it is timed
    timing     one call's time, interleaved repeats, percentiles, the busy-machine meter
    memory     peak memory of one call: CUDA in process, CPU in a fresh subprocess
    runner     runs every (size, loss method, mode) into rows
    report     the table, the summary lines and the CSV
    plot       the PNG
    cli        the command line the scripts share (its --help explains the method)

The scripts: bench_paper.py (the paper's size; what `make bench` runs),
bench_sweep.py (over N) and gpu_floors.py (launch, bandwidth and cuBLAS floors of a GPU).
"""

import sys
from pathlib import Path

# A checkout that was built in place but not pip-installed still imports ge2e_ext.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)
