"""Builds the CPU emulation of the CUDA kernels (emulate.h) as a library of ops.

    python tests/cuda_emulation/build.py BUILD_DIR [--threads 64] [--namespace ge2e_emu]
        [--cflags "-O1 ..."] [--ldflags "..."]        (prints the library's path)

or, from Python, ``build(build_dir, threads=..., namespace=...)``, then
``torch.ops.load_library(path)``: the ops are ``torch.ops.<namespace>.*``.

The sources are compiled from a copy under BUILD_DIR/src (csrc/ and
tests/cuda_emulation/), in which each ``__shared__`` declaration is followed,
on the same line, by ``GE2E_EMU_SHARED(name);`` (emulate.h then poisons that
variable before every block) and the op library's namespace is renamed (two
builds, e.g. 64 and 256 threads per block, can then be loaded in one process).
``#line`` directives keep the original file names and line numbers in
diagnostics and sanitizer reports. Nothing is written outside BUILD_DIR: the
sanitizer builds of scripts/sanitize.sh use this too, with their own flags, and
build without importing the result (an instrumented library loads only into a
process that started with the sanitizer's runtime).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMULATION = ROOT / "tests" / "cuda_emulation"
SOURCES = ("emulated_ops.cpp", "emulation_controls.cpp")
DEFAULT_NAMESPACE = "ge2e_emu"
# The finish's two-stage reduction in chunks of this many rows, at most this
# many chunks (the GPU build: 2048 and 1024), so that the tests' small batches
# take several chunks (tests/test_cuda_emulated.py names the same numbers).
FINISH_CHUNK_ROWS, FINISH_MAX_CHUNKS = 16, 4

# `__shared__ <type and attributes> name[dims]...;` on one line (CUDA allows no
# initializer); the name is the last identifier before the array bounds.
SHARED_DECLARATION = re.compile(
    r"(?P<head>(?<![\w/])__shared__\s+[^;{}=]*?(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\]]*\]\s*)*);")
LIBRARY_MACRO = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?\s*\(\s*)" + DEFAULT_NAMESPACE
                           + r"\b")


def _code_part(line: str) -> str:
    return line.split("//", 1)[0]


def instrument(text: str, path: pathlib.Path, namespace: str) -> str:
    """The source with each __shared__ declaration registered (GE2E_EMU_SHARED)
    and the op namespace renamed; raises on a __shared__ it cannot read."""
    out = [f'#line 1 "{path}"']
    for number, line in enumerate(text.splitlines(), 1):
        code = _code_part(line)
        if "__shared__" in code and not code.lstrip().startswith(("#", "*")):
            if "extern" in code:
                raise ValueError(f"{path}:{number}: dynamic (extern) __shared__ memory is not "
                                 "emulated")
            replaced, count = SHARED_DECLARATION.subn(
                lambda m: f"{m.group('head')}; GE2E_EMU_SHARED({m.group('name')});", code)
            if count != code.count("__shared__"):
                raise ValueError(f"{path}:{number}: cannot read this __shared__ declaration (one "
                                 f"variable per declaration, on one line): {line.strip()}")
            line = replaced + line[len(code):]
        if namespace != DEFAULT_NAMESPACE:
            line = LIBRARY_MACRO.sub(lambda m: m.group(1) + namespace, line)
        out.append(line)
    return "\n".join(out) + "\n"


def copy_sources(src: pathlib.Path, namespace: str) -> list[pathlib.Path]:
    """The instrumented copy of csrc/ and tests/cuda_emulation/ under src; returns
    the copies of SOURCES."""
    for folder in (ROOT / "csrc", EMULATION):
        for original in folder.rglob("*"):
            if original.suffix not in (".h", ".cuh", ".cpp", ".cu") or not original.is_file():
                continue
            copy = src / original.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            text = instrument(original.read_text(encoding="utf-8"), original, namespace)
            if not copy.exists() or copy.read_text(encoding="utf-8") != text:
                copy.write_text(text, encoding="utf-8")
    return [src / "tests" / "cuda_emulation" / name for name in SOURCES]


def build(build_dir, threads: int = 64, namespace: str = DEFAULT_NAMESPACE, cflags=("-O1",),
          ldflags=(), jobs: int | None = None, verbose: bool = False,
          prebuilt: bool = False) -> pathlib.Path:
    """Compiles the emulation into build_dir/lib<namespace>.so (again only when
    its sources or flags changed) and returns its path; does not load it. With
    prebuilt, raises instead of compiling (a sanitized process must not compile)."""
    import torch
    from torch.utils import cpp_extension

    build_dir = pathlib.Path(build_dir).resolve()
    sources = copy_sources(build_dir / "src", namespace)
    abi = int(torch.compiled_with_cxx11_abi())
    common = ["-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
              f"-DGE2E_CUDA_THREADS={threads}", f"-DGE2E_FINISH_CHUNK_ROWS={FINISH_CHUNK_ROWS}",
              f"-DGE2E_FINISH_MAX_CHUNKS={FINISH_MAX_CHUNKS}", "-Wno-attributes"]
    common += [f"-I{path}" for path in cpp_extension.include_paths()]
    common += list(cflags)
    compiler = os.environ.get("CXX", "c++")
    library = build_dir / f"lib{namespace}.so"
    stamp = hashlib.sha1("\n".join([compiler, *common, *ldflags, *(
        s.read_text(encoding="utf-8") for s in sorted((build_dir / "src").rglob("*.*")))]
    ).encode()).hexdigest()
    stamp_file = build_dir / f"lib{namespace}.stamp"
    if library.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return library
    if prebuilt:
        raise RuntimeError(f"the prebuilt CUDA emulation {library} is missing or was built from "
                           "other sources or flags (build it with tests/cuda_emulation/build.py "
                           "and the same flags)")
    objects = [build_dir / f"{namespace}-{s.stem}.o" for s in sources]
    commands = [[compiler, *common, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects)]
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    for start in range(0, len(commands), jobs):
        running = []
        for command in commands[start:start + jobs]:
            if verbose:
                print(shlex.join(command), flush=True)
            running.append((command, subprocess.Popen(command)))
        for command, process in running:
            if process.wait() != 0:
                raise RuntimeError(f"compiling the CUDA emulation failed: {shlex.join(command)}")
    lib_dirs = [f"-L{path}" for path in cpp_extension.library_paths()]
    link = [compiler, "-shared", *map(str, objects), "-o", str(library), *lib_dirs, "-lc10",
            "-ltorch", "-ltorch_cpu", "-pthread", *ldflags]
    if verbose:
        print(shlex.join(link), flush=True)
    subprocess.run(link, check=True)
    stamp_file.write_text(stamp)
    return library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_dir")
    parser.add_argument("--threads", type=int, default=64, help="GE2E_CUDA_THREADS (default 64)")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--cflags", default="-O1", help="compiler flags (one string)")
    parser.add_argument("--ldflags", default="", help="linker flags (one string)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.build_dir, args.threads, args.namespace, shlex.split(args.cflags),
                shlex.split(args.ldflags), verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
