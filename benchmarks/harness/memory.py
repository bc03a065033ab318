"""Peak memory of one call: what it adds over what was live just before it.

  CUDA  torch.cuda.reset_peak_memory_stats(), then max_memory_allocated() minus
        memory_allocated() before the call, in the benchmark's own process.
  CPU   each (provider, size, method, mode) in a fresh subprocess (this module run
        with -m) that builds the inputs, warms up once, collects garbage, reads
        VmRSS from /proc/self/status, writes "5" to /proc/self/clear_refs (which
        resets the peak VmHWM to the current RSS), makes the call and reads VmHWM;
        the peak is VmHWM - VmRSS. The subprocess runs with
        MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=131072, so glibc
        gives freed tensors back to the OS and the warm-up's freed memory cannot
        hide the call's own peak. Where clear_refs is not writable the peak comes
        from ru_maxrss (only when the call set a new lifetime maximum; else n/a).
MB means 2**20 bytes.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .common import MIB, Size, format_number, log

# glibc settings for the CPU probe (see the module docstring).
PROBE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
PROBE_TIMEOUT_S = 600
# Rough peak of the eager path per utterance-centroid pair (it keeps ~8 float32 N*M*N
# tensors alive), used to keep memory-hungry probes from running side by side.
EAGER_BYTES_PER_PAIR = 32
BENCHMARKS_DIR = str(Path(__file__).resolve().parents[1])


def cuda_peak_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory one prepared call allocates beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes(call: Callable[[], object]) -> tuple[Optional[int], str]:
    """Peak RSS one prepared call adds over the RSS before it, and how it was read."""
    gc.collect()
    try:
        rss_before = _proc_status_bytes("VmRSS")
    except (OSError, KeyError):
        return None, "n/a (no /proc/self/status)"
    if _reset_peak_rss():
        result = call()
        peak = _proc_status_bytes("VmHWM") - rss_before
        del result
        return max(peak, 0), "VmHWM"
    import resource  # Unix only, hence here

    max_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = call()
    max_rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    if max_rss_after <= max_rss_before:
        return None, "n/a (call peak hidden by an earlier one; clear_refs not writable)"
    return max(max_rss_after * 1024 - rss_before, 0), "ru_maxrss"


@dataclass(frozen=True)
class ProbeJob:
    """One CPU memory measurement of a built-in provider, run in a fresh interpreter."""

    provider: str
    n: int
    m: int
    d: int
    loss_method: str
    mode: str
    threads: int = 1

    @property
    def size(self) -> Size:
        return Size(self.n, self.m, self.d)

    @property
    def label(self) -> str:
        return f"{self.size.label} {self.loss_method} {self.mode} {self.provider}"


def run_probe(job: ProbeJob) -> dict:
    """Body of the subprocess: build, warm up once, measure one call."""
    from .providers import BUILTINS, make_inputs, prepare_call

    torch.set_num_threads(job.threads)
    inputs = make_inputs(job.size, torch.device("cpu"))
    loss_fn = BUILTINS[job.provider].build(job.loss_method)
    prepare_call(loss_fn, inputs, job.mode)()  # warm-up (and compile)
    peak, how = cpu_peak_bytes(prepare_call(loss_fn, inputs, job.mode))
    return {"peak_bytes": peak, "how": how}


def spawn_probe(job: ProbeJob) -> tuple[Optional[int], str]:
    """Runs one probe in a fresh interpreter; (peak bytes or None, note)."""
    command = [sys.executable, "-m", "harness.memory", json.dumps(asdict(job))]
    path = os.pathsep.join(filter(None, [BENCHMARKS_DIR, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **PROBE_MALLOC_ENV, "PYTHONPATH": path}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "memory probe timed out"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last_error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed: {last_error}"
    answer = json.loads(lines[-1])
    return answer["peak_bytes"], ("" if answer["how"] == "VmHWM" else answer["how"])


def run_probes(jobs: Sequence[ProbeJob]) -> dict[ProbeJob, tuple[Optional[int], str]]:
    """All probes, after the timing (so they cannot disturb it): small ones two at a
    time, ones that may need gigabytes (eager at large N) one at a time."""
    small = [job for job in jobs if job.size.utterance_pairs * EAGER_BYTES_PER_PAIR < 2 ** 30]
    large = [job for job in jobs if job not in small]
    results: dict[ProbeJob, tuple[Optional[int], str]] = {}
    for batch, workers in ((small, max(1, min(2, os.cpu_count() or 1))), (large, 1)):
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(spawn_probe, job): job for job in batch}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                results[job] = future.result()
                peak = results[job][0]
                log(f"  memory {len(results)}/{len(jobs)}: {job.label}: "
                    f"{format_number(None if peak is None else peak / MIB)} MB")
    return results


if __name__ == "__main__":
    print(json.dumps(run_probe(ProbeJob(**json.loads(sys.argv[1])))))
