"""Every test runs offline, seeded, on at most two threads (the CI box has two shared cores); under pytest-xdist
(pyproject's addopts: one worker per core, at most four) each worker runs one torch thread, and so do the processes
its tests start, since several multi-threaded torch processes on a small box thrash."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the shared 2-core box's oversubscribed OpenMP pool is ~20x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The tiny SD model as a diffusers folder (path as str), built once per test module."""
    from tests.fixtures import make_tiny_folder

    return str(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Test tiers: a test whose call takes over SLOW_SECONDS on the 2-core box is marked @pytest.mark.slow, so that
# `python -m pytest -m "not slow"` stays a quick suite. An unmarked test that takes more than SLOW_FACTOR times that
# is reported at the end (a generous margin: a loaded machine runs everything slower); PRIVLORA_STRICT_SLOW=1 makes it
# a failure of the session.
SLOW_SECONDS = 5.0
SLOW_FACTOR = 3.0
_unmarked_slow: list[tuple[str, float]] = []


def pytest_runtest_logreport(report):
    """Called where the session is reported (the controller, under xdist), with the markers in the keywords."""
    if (report.when == "call" and report.passed and "slow" not in report.keywords
            and report.duration > SLOW_SECONDS * SLOW_FACTOR):
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if not _unmarked_slow:
        return
    terminalreporter.section("tests to mark @pytest.mark.slow")
    for nodeid, seconds in _unmarked_slow:
        terminalreporter.write_line(f"{nodeid}: {seconds:.1f} s unmarked (limit {SLOW_SECONDS:g} s x {SLOW_FACTOR:g})")


def pytest_sessionfinish(session, exitstatus):
    if _unmarked_slow and os.environ.get("PRIVLORA_STRICT_SLOW") == "1" and exitstatus == 0:
        session.exitstatus = 1
