#!/usr/bin/env python
"""Over N: how time and memory of forward+backward grow with the number of speakers.

By default N = 8, 16, .., 4096 speakers at M=10 utterances and D=256, float32,
both loss methods, forward+backward only, with the loop reference (where one call
is affordable), eager PyTorch, ge2e_ext and the floor of 3 matrix products;
without torch.compile, which would compile afresh at every size (add it with
--providers). The PNG has bars of time and peak memory per N, on a log scale.

The project's large-batch figures, in one run:
    python benchmarks/bench_sweep.py --device cpu --sizes 1024x10x512,2048x10x256 \\
        --providers eager,ge2e_ext,floor
(ge2e_ext against its floor at 1024x10x512; peak memory of ge2e_ext and eager at N=2048.)
"""

import sys

from harness.cli import script
from harness.common import FWD_BWD

# main(argv=None, extra_providers=None) -> exit code, for tests and other scripts
main = script("bench_sweep.py", __doc__, stem="ge2e_sweep", sizes="n", modes=(FWD_BWD,),
              providers=("reference", "eager", "ge2e_ext", "floor"))

if __name__ == "__main__":
    sys.exit(main())
