"""The documentation's code runs as written.

Every ```python block of README.md and docs/*.md runs on its own, in a fresh
interpreter started in the checkout (so a block cannot lean on an earlier one), and
must exit cleanly. A block that cannot run here says so in an HTML comment on the
line before its fence, which the rendered page does not show:

    <!-- block-test: cuda -->                 runs only where a GPU is visible
    <!-- block-test: several-processes -->    skipped: needs a launcher such as torchrun
    <!-- block-test: skip <reason> -->         skipped, with the reason

Every shell block (```bash, ```sh, ```shell, ```console) starts with a comment line
saying where it runs ("# in the checkout, in ..."). New blocks are picked up by
themselves.
"""

import glob
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*block-test:\s*(.*?)\s*-->\s*$")
SHELLS = ("bash", "sh", "shell", "console")


def _blocks(languages):
    """(document, line, language, code, marker or None) of each fenced block."""
    found = []
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding="utf-8") as f:
            text = f.read()
        for match in FENCE.finditer(text):
            if match.group(1) not in languages:
                continue
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            line = text.count("\n", 0, match.start()) + 1
            found.append((document, line, match.group(1), match.group(2),
                          marker.group(1) if marker else None))
    return found


PYTHON_BLOCKS = _blocks(("python", "py"))


KNOWN_MARKERS = re.compile(r"cuda$|several-processes$|skip .+")


def _skip_reason(marker):
    if marker == "cuda" and not torch.cuda.is_available():
        return "the block needs a GPU"
    if marker == "several-processes":
        return "the block needs several processes (a launcher such as torchrun)"
    if marker is not None and marker.startswith("skip "):
        return marker[len("skip "):]
    return None


def _param(document, line, language, code, marker):
    reason = _skip_reason(marker)
    marks = [pytest.mark.skip(reason=f"{document}:{line}: {reason}")] if reason else []
    return pytest.param(document, line, code, marks=marks, id=f"{document}:{line}")


def test_the_documents_have_python_blocks():
    assert sum(doc == "README.md" for doc, *_ in PYTHON_BLOCKS) >= 2


def test_block_markers_are_known():
    unknown = [(f"{doc}:{line}", marker) for doc, line, _, _, marker in PYTHON_BLOCKS
               if marker is not None and not KNOWN_MARKERS.match(marker)]
    assert not unknown, ("unknown block-test markers (known: cuda, several-processes, "
                         f"skip <reason>): {unknown}")


@pytest.mark.parametrize("document, line, code", [_param(*block) for block in PYTHON_BLOCKS])
def test_python_block_runs_as_written(document, line, code):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, (
        f"the block at {document}:{line} failed:\n{code}\n--- output ---\n"
        f"{result.stdout}{result.stderr}")


def test_shell_blocks_say_where_they_run():
    blocks = _blocks(SHELLS)
    assert blocks, "expected shell blocks in the README"
    unsaid = [f"{doc}:{line}" for doc, line, _, code, _ in blocks
              if not re.match(r"# (in|on) ", code)]
    assert not unsaid, (f"shell blocks without a first comment line saying where they run "
                        f"('# in the checkout, in ...'): {unsaid}")
