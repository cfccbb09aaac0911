"""The CI rule the suite enforces on itself: under CI=true a skip fails the run unless the test is hardware-only, on
one process or on pytest-xdist's workers (README's command runs two), where the skip happens on a worker."""

import pytest

from helpers import ROOT

WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one_process", "xdist"])

INNER = '''
import pytest

def test_skips():
    pytest.skip("a dependency is missing")

def test_passes():
    assert True
'''


def inner_run(pytester, monkeypatch, ci: str, workers: list[str]):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *workers)


@WORKERS
def test_a_skip_fails_under_ci(pytester, monkeypatch, workers):
    result = inner_run(pytester, monkeypatch, "true", workers)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true but not on tests/conftest.py's HARDWARE_ONLY*"])


@WORKERS
def test_a_skip_is_a_skip_outside_ci(pytester, monkeypatch, workers):
    inner_run(pytester, monkeypatch, "", workers).assert_outcomes(passed=1, skipped=1)


@WORKERS
def test_a_module_level_importorskip_fails_under_ci(pytester, monkeypatch, workers):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_missing='import pytest\npytest.importorskip("no_such_package_here")\n\ndef test_x():\n    pass\n')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *workers)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true*"])
