"""The CI rule the suite enforces on itself: under CI=true a skip fails the run unless the test is hardware-only."""

from helpers import ROOT

INNER = '''
import pytest

def test_skips():
    pytest.skip("a dependency is missing")

def test_passes():
    assert True
'''


def inner_run(pytester, monkeypatch, ci: str):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_a_skip_fails_under_ci(pytester, monkeypatch):
    result = inner_run(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true but not on tests/conftest.py's HARDWARE_ONLY*"])


def test_a_skip_is_a_skip_outside_ci(pytester, monkeypatch):
    inner_run(pytester, monkeypatch, "").assert_outcomes(passed=1, skipped=1)


def test_a_module_level_importorskip_fails_under_ci(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_missing='import pytest\npytest.importorskip("no_such_package_here")\n\ndef test_x():\n    pass\n')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true*"])
