#!/usr/bin/env python
"""The paper's batch: how ge2e_ext compares with the code it replaces (what `make bench` runs).

N=64 speakers x M=10 utterances x D=256 (Wan et al.'s batch), float32, both loss
methods, forward, backward and forward+backward, every provider: the loop
reference, eager PyTorch (backend="torch"), torch.compile of it, ge2e_ext, and
the floor of 3 matrix products (forward+backward). Prints the table and one
summary line per loss method: ge2e_ext's speed-up and memory saving against
each provider and its time as a multiple of the floor.

    python benchmarks/bench_paper.py --quick     # about a minute on 2 CPU cores
    python benchmarks/bench_paper.py --device cuda --output DIR
"""

import sys

from harness.cli import script

# main(argv=None, extra_providers=None) -> exit code, for tests and other scripts
main = script("bench_paper.py", __doc__, stem="ge2e_bench", sizes="paper",
              quick_note="; about a minute on 2 CPU cores, torch.compile included")

if __name__ == "__main__":
    sys.exit(main())
