"""The Viterbi backends that the oracle and property tests run on (test_viterbi.py, test_properties.py).

``reference`` is the plain tensor code: what runs on CUDA for S ≠ 2, for third derivatives, and wherever no C
compiler exists. ``cpu`` is the C kernel (the default on CPU when a compiler exists). Each oracle test takes a
``backend`` parameter and passes it explicitly (``backend=...``), so a backend is checked against the oracle itself,
not only against another backend. ``triton`` runs the same oracles through Triton's interpreter in a subprocess
(test_viterbi.py::test_oracles_on_triton_through_the_interpreter), as TRITON_INTERPRET is read when Triton compiles.
"""

from __future__ import annotations

import pytest

from structattn.ops.kernels import cpu

NO_COMPILER = "no C compiler on this machine ($CC, cc, gcc, clang)"

# Only a machine without a C compiler skips the C kernel: one that fails to build must fail the tests.
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(cpu._compiler() is None, reason=NO_COMPILER)),
]
