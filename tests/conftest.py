import os

import pytest
import torch

# pytest-xdist's workers (README's command runs `-n 2`) share the machine's cores: each takes its share of threads, and
# the processes a test starts inherit it (OMP_NUM_THREADS), so two workers on two cores do not oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    THREADS = max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)

# The only tests allowed to skip under CI=true: each needs hardware a CI machine cannot have (nodeid: why).
# Any other skip (a missing dependency we ship, a service the test could start) fails the CI run.
HARDWARE_ONLY = {
    "tests/cli/test_benchmarks.py::test_gpu_throughput_benchmark_on_cuda": "needs a CUDA GPU",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_as_failure(report, nodeid: str) -> None:
    """Under CI=true, a skip outside HARDWARE_ONLY becomes a failure that says why."""
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and nodeid not in HARDWARE_ONLY:
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true but not on tests/conftest.py's HARDWARE_ONLY list (hardware-only "
                           f"tests): {report.longrepr}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    skip_as_failure(outcome.get_result(), item.nodeid.split("@")[0])  # xdist appends @<group> under --dist loadgroup


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    skip_as_failure(outcome.get_result(), collector.nodeid)  # a module-level skip (importorskip)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `--dist loadgroup`, the tests that use a module-scoped fixture of their own module (a trained run, say) run
    on one worker, which builds it once, not once per worker; a test that names its xdist_group keeps it."""
    for item in items:
        module = item.nodeid.split("::")[0]
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is None or item.get_closest_marker("xdist_group"):
            continue
        if any(defs[-1].scope == "module" and defs[-1].baseid == module for defs in fixtures.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so thresholds are deterministic."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one thread avoids OpenMP spinning and is bitwise stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
