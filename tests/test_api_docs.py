"""docs/api.md and the docstrings stay in step with the code.

Every ```text block of docs/api.md that starts with ``ge2e_ext.`` is a signature
line (wrapped as one likes) and must equal the object's signature, annotations as
written in the source; every public name (``ge2e_ext.__all__``) has one; the public
docstrings have torch.nn's sections and their examples run (doctest).
"""

import doctest
import inspect
import os
import re

import pytest

import ge2e_ext
import ge2e_ext.reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as _f:
    API_MD = _f.read()
DOCUMENTED = {
    re.match(r"[\w.]+", block).group(): " ".join(block.split())
    for block in re.findall(r"^```text\n(ge2e_ext\..*?)^```", API_MD, re.M | re.S)
}
PUBLIC_CALLABLES = {
    "ge2e_ext.GE2ELoss": ge2e_ext.GE2ELoss,
    "ge2e_ext.GE2ELoss.forward": ge2e_ext.GE2ELoss.forward,
    "ge2e_ext.ge2e_loss": ge2e_ext.ge2e_loss,
    "ge2e_ext.extension_devices": ge2e_ext.extension_devices,
    "ge2e_ext.cpu_capability": ge2e_ext.cpu_capability,
    "ge2e_ext.reference.ge2e_loss_reference": ge2e_ext.reference.ge2e_loss_reference,
}


class _AsWritten:
    """An annotation shown as its source text (the modules use postponed annotations)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text if isinstance(self.text, str) else inspect.formatannotation(self.text)


def signature_as_written(obj):
    signature = inspect.signature(obj)
    empty = inspect.Signature.empty
    parameters = [p.replace(annotation=_AsWritten(p.annotation)) if p.annotation is not empty
                  else p for p in signature.parameters.values()]
    returns = signature.return_annotation
    return str(signature.replace(parameters=parameters, return_annotation=(
        _AsWritten(returns) if returns is not empty else empty)))


def _normalized(text):
    return re.sub(r"\s+", "", text)


def test_every_public_name_is_documented():
    for name in ge2e_ext.__all__:
        assert f"ge2e_ext.{name}" in DOCUMENTED, f"docs/api.md has no signature for {name}"
        assert f"## `ge2e_ext.{name}`" in API_MD, f"docs/api.md has no section for {name}"
    unknown = set(DOCUMENTED) - set(PUBLIC_CALLABLES) - {"ge2e_ext.LOSS_METHODS"}
    assert not unknown, f"docs/api.md documents names this test does not know: {unknown}"


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_documented_signature_is_the_code_s(name):
    expected = name + signature_as_written(PUBLIC_CALLABLES[name])
    assert _normalized(DOCUMENTED[name]) == _normalized(expected), (
        f"docs/api.md says\n  {DOCUMENTED[name]}\nthe code says\n  {expected}")


def test_documented_loss_methods_are_the_code_s():
    assert _normalized(DOCUMENTED["ge2e_ext.LOSS_METHODS"]) == _normalized(
        f"ge2e_ext.LOSS_METHODS = {ge2e_ext.LOSS_METHODS!r}")


def test_the_signature_check_can_fail():
    def f(x: "torch.Tensor", *, y: "int | None" = None) -> "float":
        pass

    assert signature_as_written(f) == "(x: torch.Tensor, *, y: int | None = None) -> float"
    assert _normalized("ge2e_ext.f(x: torch.Tensor)") != _normalized(
        "ge2e_ext.f" + signature_as_written(f))


@pytest.mark.parametrize("obj", [ge2e_ext.GE2ELoss, ge2e_ext.ge2e_loss],
                         ids=["GE2ELoss", "ge2e_loss"])
def test_loss_docstrings_have_torch_nn_sections(obj):
    doc = inspect.getdoc(obj)
    for section in ("Args:", "Shape:", "Example::"):
        assert f"\n{section}\n" in doc, f"{obj.__name__}'s docstring lacks {section}"
    for name in inspect.signature(obj).parameters:
        assert re.search(rf"^    {name}\b.*:", doc, re.M), \
            f"{obj.__name__}'s Args do not describe {name}"


@pytest.mark.parametrize("name", ["GE2ELoss", "ge2e_loss", "extension_devices",
                                  "cpu_capability"])
def test_docstring_examples_run(name):
    obj = getattr(ge2e_ext, name)
    assert ">>> " in inspect.getdoc(obj), f"{name}'s docstring has no example"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(obj, name, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, f"{name}'s example failed"
