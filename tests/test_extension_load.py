"""A compiled module that exists but cannot load (built against another torch, say) is
said, once, with the reason; a checkout used without building stays quiet. Each case
runs in a fresh interpreter on a copy of the Python package."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports ge2e_ext twice and computes a loss with backend="auto" twice, recording every
# warning (filter "always": the count is the library's, not the warnings registry's).
PROBE = r"""
import json, sys, warnings
# An editable install of ge2e_ext elsewhere would resolve ge2e_ext._C to its own build.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ge2e_ext
    import importlib; importlib.import_module("ge2e_ext")
    import torch
    x = torch.randn(3, 2, 4)
    losses = [ge2e_ext.ge2e_loss(x, 10.0, -5.0).item() for _ in range(2)]
    try:
        ge2e_ext.ge2e_loss(x, 10.0, -5.0, backend="extension")
        extension_error = None
    except RuntimeError as error:
        extension_error = str(error)
print(json.dumps({"warnings": [str(w.message) for w in caught
                               if "ge2e_ext" in str(w.message)],
                  "devices": sorted(ge2e_ext.extension_devices()),
                  "extension_error": extension_error, "file": ge2e_ext.__file__}))
"""


# The name this Python imports an extension module by (_C.cpython-311-x86_64-linux-gnu.so).
SO_NAME = "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def _package_copy(tmp_path, compiled=None):
    package = tmp_path / "ge2e_ext"
    package.mkdir()
    for path in glob.glob(os.path.join(ROOT, "ge2e_ext", "*.py")):
        shutil.copy(path, package)
    if compiled is not None:
        (package / SO_NAME).write_bytes(compiled)
    return package


def _probe(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file"] == str(tmp_path / "ge2e_ext" / "__init__.py")
    return report


def test_a_module_that_cannot_load_warns_once_with_the_reason(tmp_path):
    _package_copy(tmp_path, compiled=b"not an ELF file: a build for another platform or torch")
    report = _probe(tmp_path)
    assert report["devices"] == []
    assert len(report["warnings"]) == 1, report["warnings"]
    (message,) = report["warnings"]
    assert f"{SO_NAME} cannot be loaded" in message
    assert "invalid ELF header" in message or "file too short" in message  # the loader's reason
    assert "rebuild it against this torch" in message and "pure-PyTorch" in message
    # The reason is also what backend="extension" says.
    assert "failed to import" in report["extension_error"]


def test_a_checkout_without_a_build_is_quiet(tmp_path):
    _package_copy(tmp_path)
    report = _probe(tmp_path)
    assert report["devices"] == [] and report["warnings"] == []


@pytest.mark.skipif(not glob.glob(os.path.join(ROOT, "ge2e_ext", "_C.*")),
                    reason="needs the compiled module (an in-place build)")
def test_a_module_that_loads_is_quiet(tmp_path):
    package = _package_copy(tmp_path)
    for path in glob.glob(os.path.join(ROOT, "ge2e_ext", "_C.*")):
        shutil.copy(path, package)
    report = _probe(tmp_path)
    assert "cpu" in report["devices"] and report["warnings"] == []
