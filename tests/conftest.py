"""Shared test configuration: hypothesis profiles, per-test seeding, CUDA tests, and the CI's rule on skips.

Hypothesis: one profile for every property test. ``ci`` (default) keeps the suite fast on 2 cores; set
``STRUCTATTN_HYPOTHESIS=thorough`` for a long search (e.g. before a release or after changing a kernel)::

    STRUCTATTN_HYPOTHESIS=thorough bash scripts/test.sh tests/test_properties.py tests/test_reliability_attention.py

Both profiles disable hypothesis' per-example deadline and the too-slow health check: examples run float64
dynamic programmes whose time varies with the drawn shapes and with the machine's load, which says nothing about
correctness.

Seeding: every test starts from torch / random / numpy generators seeded from its own node id, so a test's random
inputs are the same in every run, alone or in the suite, in any order and in any pytest-xdist worker.

CUDA: a test that needs a CUDA device is marked ``@pytest.mark.cuda`` (nothing else); without a device it is skipped
here with the one reason :data:`NO_CUDA`. ``scripts/gpu_check.sh`` runs every file holding such a test on a GPU
(tests/test_gpu_check.py checks that none is left out).

Skips in CI: with ``STRUCTATTN_STRICT_SKIPS=1`` (set by ``.ci/run``) a test or module skipped for any other reason
than :data:`NO_CUDA` fails the run — a missing package (fairseq, OpenNMT-py, Chromium, a C compiler) is a broken
CI install, not a green run with skips. A skipped test becomes a failure with the reason; a module skipped at
collection (``importorskip`` at module level) is listed at the end and sets the exit status to 1.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the library's own tests do not need hypothesis; the property tests import it themselves
    settings = None

HYPOTHESIS_PROFILES = {"ci": 60, "thorough": 2000}  # profile name -> examples per property

if settings is not None:
    for _name, _examples in HYPOTHESIS_PROFILES.items():
        settings.register_profile(_name, max_examples=_examples, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
    _profile = os.environ.get("STRUCTATTN_HYPOTHESIS", "ci")
    if _profile not in HYPOTHESIS_PROFILES:
        raise ValueError(f"STRUCTATTN_HYPOTHESIS={_profile!r}: choose one of {sorted(HYPOTHESIS_PROFILES)}")
    settings.load_profile(_profile)

# The one skip reason allowed under STRUCTATTN_STRICT_SKIPS=1 (the CI machines have no GPU).
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
STRICT_SKIPS = os.environ.get("STRUCTATTN_STRICT_SKIPS") == "1"


# ---- seeding -------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed_random_generators(request):
    """Seed torch (every device), ``random`` and numpy from the test's node id before it runs: deterministic per
    test and independent of which tests ran before it (order, -k selections, xdist workers)."""
    seed = zlib.crc32(request.node.nodeid.encode("utf-8"))
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed)
    import torch

    torch.manual_seed(seed)
    yield


# ---- pytest-xdist (scripts/test.sh runs two workers, --dist loadscope) -----------------------------------------------


def pytest_configure(config):
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        # Each worker's torch gets its share of the cores: two workers × all cores would oversubscribe them.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workerinput.get("workercount", 1))))


#: The modules of longest run time, longest first, with their rough worker-seconds in the CI (2-core VM, the
#: --durations of 2026-12-03): they start first, one per worker, so that neither worker is left with a long module
#: at the end while the other idles (longest-first scheduling). Only the order depends on these numbers.
HEAVIEST_MODULES = (
    "tests/test_fairseq_e2e.py",  # ~300 s: eight attentions trained and decoded with the fairseq CLIs
    "tests/test_recipes_e2e.py",  # ~250 s: the Bible recipe, fairseq and OpenNMT-py
    "tests/test_onmt_e2e.py",  # ~200 s
    "tests/test_distributed.py",  # ~130 s
    "tests/test_transformer_e2e.py",  # ~120 s
    "tests/test_dump_fairseq.py",  # ~120 s
    "tests/test_exit_abort.py",  # ~85 s
)


def _heavy_modules_first(items):
    """Stable reorder: :data:`HEAVIEST_MODULES` in that order, then the other modules holding ``slow`` tests
    (end-to-end trainings), then the rest. scripts/test.sh runs xdist with --dist loadscope
    --no-loadscope-reorder, which hands whole modules to the workers in this order (xdist's default reorder would
    sort them by their number of tests, which put the long few-test modules last: one worker ran the Bible recipe
    for minutes after the other had finished)."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow") is not None}
    rank = {module: i for i, module in enumerate(HEAVIEST_MODULES)}

    def key(item):
        module = item.nodeid.split("::")[0]
        return (rank.get(module, len(rank)), module not in slow)

    items.sort(key=key)


# ---- CUDA tests ----------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # the order only matters to xdist's scheduling
        _heavy_modules_first(items)
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in cuda_items:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


# ---- STRUCTATTN_STRICT_SKIPS=1 -------------------------------------------------------------------------------------


def _skip_reason(longrepr) -> str:
    """The reason of a skipped report (pytest stores (path, line, 'Skipped: reason'))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed(reason: str) -> bool:
    return reason == NO_CUDA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not STRICT_SKIPS or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report.longrepr)
    if not _allowed(reason):
        report.outcome = "failed"
        report.longrepr = (f"STRUCTATTN_STRICT_SKIPS=1: skipped for a reason other than {NO_CUDA!r}, which fails "
                           f"the run: {reason}")


_bad_collection_skips: list[tuple[str, str]] = []


def pytest_collectreport(report):
    # Called in the controller for every module, also under pytest-xdist (workers forward their reports).
    if STRICT_SKIPS and report.skipped:
        reason = _skip_reason(report.longrepr)
        if not _allowed(reason):
            _bad_collection_skips.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _bad_collection_skips:
        tr = terminalreporter
        tr.section("STRUCTATTN_STRICT_SKIPS=1: modules skipped at collection", sep="=", red=True, bold=True)
        for nodeid, reason in _bad_collection_skips:
            tr.line(f"FAILED (skipped module) {nodeid}: {reason}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _bad_collection_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
