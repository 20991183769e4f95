"""The rules tests/conftest.py sets for the whole suite, checked on a throw-away suite run by a real pytest:
STRUCTATTN_STRICT_SKIPS=1 (set by .ci/run) fails any skip other than "no CUDA device", at run time and at
collection, also under pytest-xdist; ``@pytest.mark.cuda`` tests skip with that one reason without a device; every
test gets the same seeded random numbers whatever the order, the selection or the worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SUITE = {
    "test_a.py": '''
import random
import pytest
import torch

def test_passes():
    pass

def test_skipped_for_a_package():
    pytest.skip("somepackage is not installed")

@pytest.mark.cuda
def test_needs_a_gpu():
    assert torch.cuda.is_available()

@pytest.mark.parametrize("i", range(3))
def test_prints_its_random_numbers(i):
    print(f"RANDOM {i} {torch.rand(1).item():.17g} {random.random():.17g}")
''',
    "test_b.py": '''
import pytest
pytest.importorskip("a_module_that_does_not_exist_xyz")

def test_never_collected():
    pass
''',
}


def _run(suite: Path, *args, strict: bool):
    if not suite.exists():
        suite.mkdir()
        shutil.copy(HERE / "conftest.py", suite / "conftest.py")
        for name, text in SUITE.items():
            (suite / name).write_text(text)
        (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    env = {k: v for k, v in os.environ.items() if k not in ("STRUCTATTN_STRICT_SKIPS", "PYTEST_ADDOPTS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the machine has no GPU, also when this runs on one
    if strict:
        env["STRUCTATTN_STRICT_SKIPS"] = "1"
    # -rA: the summary lists every outcome with its reason, and passed tests' captured output (also from workers)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args], cwd=suite,
                          env=env, capture_output=True, text=True, timeout=300)


def _randoms(out: str) -> dict:
    return dict(re.findall(r"RANDOM (\d) (\S+ \S+)", out))


NO_CUDA_SKIP = r"SKIPPED \[1\] test_a.py:\d+: no CUDA device \(torch.cuda.is_available\(\) is False\)"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The throw-away suite's directory and its run without the switch."""
    suite = tmp_path_factory.mktemp("rules") / "suite"
    return suite, _run(suite, strict=False)


def test_without_the_switch_skips_are_skips(plain):
    _, p = plain
    assert p.returncode == 0, p.stdout[-3000:]
    assert re.search(NO_CUDA_SKIP, p.stdout), p.stdout[-3000:]
    assert "somepackage is not installed" in p.stdout and "a_module_that_does_not_exist_xyz" in p.stdout
    assert re.search(r"4 passed, 3 skipped", p.stdout), p.stdout[-1500:]


@pytest.mark.parametrize("xdist", [False, True])
def test_strict_skips_fail_the_run_except_no_cuda(plain, xdist):
    """... and the seeded random numbers of every test are the ones of the plain run (in xdist's workers too)."""
    suite, p0 = plain
    p = _run(suite, *(["-n", "2"] if xdist else []), strict=True)
    out = p.stdout
    assert p.returncode == 1, out[-3000:]
    assert re.search(r"FAILED test_a.py::test_skipped_for_a_package", out), out[-3000:]
    assert "skipped for a reason other than 'no CUDA device (torch.cuda.is_available() is False)', which fails " \
           "the run: somepackage is not installed" in out
    # the module skipped at collection is listed and fails the run too
    assert "FAILED (skipped module) test_b.py: could not import 'a_module_that_does_not_exist_xyz'" in out
    # the CUDA test is still a skip, with the one allowed reason
    assert re.search(NO_CUDA_SKIP, out) and "FAILED test_a.py::test_needs_a_gpu" not in out
    assert re.search(r"1 failed, 4 passed, 2 skipped", out), out[-1500:]
    full = _randoms(p0.stdout)
    assert len(full) == 3 and len(set(full.values())) == 3  # different numbers in different tests
    assert _randoms(out) == full


def test_random_numbers_do_not_depend_on_the_order_or_the_selection(plain):
    suite, p0 = plain
    ids = [f"test_a.py::test_prints_its_random_numbers[{i}]" for i in (2, 0)]
    got = _randoms(_run(suite, *ids, strict=False).stdout)
    full = _randoms(p0.stdout)
    assert got == {"2": full["2"], "0": full["0"]}
