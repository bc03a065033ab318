"""CHANGELOG.md and CITATION.cff agree with the one version source, ge2e_ext/_version.py."""

import os
import re

import ge2e_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_newest_released_version_is_the_package_version():
    sections = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?", _read("CHANGELOG.md"),
                          re.M)
    assert sections and sections[0] == ("Unreleased", ""), \
        "CHANGELOG.md starts with an [Unreleased] section"
    released = sections[1:]
    assert released and all(date for _, date in released), \
        f"every released section has a date: {released}"
    assert released[0][0] == ge2e_ext.__version__, (
        f"CHANGELOG.md's newest release is {released[0][0]}, ge2e_ext/_version.py says "
        f"{ge2e_ext.__version__}: a release moves Unreleased into a new section")
    dates = [date for _, date in released]
    assert dates == sorted(dates, reverse=True), "newest release first"


def test_citation_names_the_paper_and_this_version():
    citation = _read("CITATION.cff")
    assert re.search(rf'^version: "{re.escape(ge2e_ext.__version__)}"$', citation, re.M)
    assert "Generalized End-to-End Loss for Speaker Verification" in citation
    assert "1710.10467" in citation
    for author in ("Wan", "Wang", "Papir", "Lopez Moreno"):
        assert f"family-names: {author}\n" in citation
