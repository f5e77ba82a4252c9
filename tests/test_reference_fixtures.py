"""The reference fixtures travel with the repository, and a reference test that skips fails the run.

The hooks are checked by running pytest in a subprocess on a small generated test file, with this suite's own
conftest.py copied beside it (so its ``tests/fixtures/reference`` is missing there).
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import conftest

GENERATED = '''
import pytest


@pytest.mark.reference
def test_marked_skip_in_call():
    pytest.skip("no parity data today")


@pytest.mark.reference
@pytest.mark.skipif(True, reason="a skipif on a reference test")
def test_marked_skipif():
    pass


@pytest.fixture
def sgm_reference_dir():
    pytest.skip("an overriding fixture that skips")


def test_unmarked_but_asks_for_a_reference_fixture(sgm_reference_dir):
    pass


def test_missing_fixtures_fail(reference_dir):
    pass


def test_plain_skip_stays_a_skip():
    pytest.skip("not a reference test")


@pytest.mark.reference
@pytest.mark.xfail(reason="expected", strict=True)
def test_reference_xfail_stays_an_xfail():
    assert False


@pytest.mark.reference
def test_reference_pass():
    pass
'''


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (passed | failure | error | skipped, message and text) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kind, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kind, text = child.tag, f"{child.get('message', '')}\n{child.text or ''}"
                break
        out[case.get("name")] = (kind, text)
    return out


def test_a_skipped_reference_test_fails_and_names_the_reason(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(Path(conftest.__file__).read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    reference: reads the reference fixtures\n")
    (tmp_path / "test_generated.py").write_text(GENERATED)
    junit = tmp_path / "junit.xml"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "test_generated.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    got = _outcomes(junit)
    assert set(got) == {
        "test_marked_skip_in_call", "test_marked_skipif", "test_unmarked_but_asks_for_a_reference_fixture",
        "test_missing_fixtures_fail", "test_plain_skip_stays_a_skip", "test_reference_xfail_stays_an_xfail",
        "test_reference_pass",
    }, run.stdout
    # a skip while running the test: a failure
    kind, text = got["test_marked_skip_in_call"]
    assert kind == "failure" and "reference test skipped" in text and "no parity data today" in text
    # a skip while setting it up (a skipif mark, a fixture that skips): an error, which fails the run as well
    kind, text = got["test_marked_skipif"]
    assert kind == "error" and "a skipif on a reference test" in text
    kind, text = got["test_unmarked_but_asks_for_a_reference_fixture"]
    assert kind == "error" and "an overriding fixture that skips" in text
    # no tests/fixtures/reference beside that conftest: the fixture fails and says what is missing
    kind, text = got["test_missing_fixtures_fail"]
    assert kind == "error" and "reference fixtures missing" in text and str(tmp_path / "fixtures") in text
    # what is not a skipped reference test keeps its outcome
    assert got["test_plain_skip_stays_a_skip"][0] == "skipped"
    assert got["test_reference_xfail_stays_an_xfail"][0] == "skipped"  # JUnit writes an xfail as a skip
    assert "expected" in got["test_reference_xfail_stays_an_xfail"][1]
    assert got["test_reference_pass"][0] == "passed"


def test_reference_fixtures_are_inside_the_repository(reference_dir: Path, sgm_reference_dir: Path) -> None:
    tests = Path(__file__).resolve().parent
    assert reference_dir == tests / "fixtures" / "reference" / "compvis"
    assert sgm_reference_dir == tests / "fixtures" / "reference" / "sgm"
    for folder in (reference_dir, sgm_reference_dir):
        assert (folder / "README.md").is_file()
        assert any((folder / "parity").glob("*.safetensors")) and any((folder / "manifests").glob("*.json"))
    assert (reference_dir.parent / "README.md").is_file()
