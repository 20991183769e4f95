"""The Viterbi backend registry (structattn.ops.kernels.registry): a backend is one object implementing the
ViterbiBackend protocol plus one register() line declaring what it serves; dispatch (structattn.ops.viterbi) reads
only the registry.

Checked here: every real backend satisfies the protocol (same pass names and parameters); a fake backend registered
by a test is selectable by name (argument, default, context manager, custom op, torch.compile), is loaded lazily, and
is picked by "auto" where it is the first to serve; its declared dtypes/devices/S produce the same errors as the
built-in backends; unknown names raise the same ValueError as before the registry; importing structattn imports
neither Triton nor the C kernel module.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import structattn.ops.viterbi as V
from structattn import viterbi_hvp, viterbi_marginals, viterbi_value
from structattn.ops import kernels
from structattn.ops.kernels import ViterbiBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = ("forward", "marginals", "backward", "hvp")


class _Fake:
    """A backend that runs the reference passes and records which ones were called."""

    calls: list[str] = []

    @staticmethod
    def available():
        return True

    @staticmethod
    def unavailable_reason():
        return None

    @classmethod
    def forward(cls, theta, lengths, reg, gamma):
        cls.calls.append("forward")
        return V._Reference.forward(theta, lengths, reg, gamma)

    @classmethod
    def marginals(cls, theta, lengths, reg, gamma):
        cls.calls.append("marginals")
        return V._Reference.marginals(theta, lengths, reg, gamma)

    @classmethod
    def backward(cls, Q, r, lengths):
        cls.calls.append("backward")
        return V._Reference.backward(Q, r, lengths)

    @classmethod
    def hvp(cls, Q, U, r, Z, lengths, reg, gamma):
        cls.calls.append("hvp")
        return V._Reference.hvp(Q, U, r, Z, lengths, reg, gamma)


@pytest.fixture
def fake():
    """Register "fake" (CPU, float64, any S) for one test; the loader counts how often it runs."""
    loads = []

    def loader():
        loads.append(1)
        return _Fake

    _Fake.calls = []
    entry = kernels.register("fake", loader, devices=("cpu",), dtypes=(torch.float64,))
    try:
        yield entry, loads
    finally:
        kernels.unregister("fake")


def _case(B=3, T=4, S=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(B, T, S, S, generator=g, dtype=dtype)
    return theta, torch.randn(B, T, S, S, generator=g, dtype=dtype), torch.tensor([T, 2, 0])[:B]


# ---- the protocol ---------------------------------------------------------------------------------------------------


def test_built_in_registrations_in_order():
    assert kernels.names()[:3] == ("reference", "cpu", "triton")
    assert V.BACKENDS == ("auto", "reference", "cpu", "triton")


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_every_real_backend_satisfies_the_protocol(name):
    impl = kernels.get(name)  # imports the module (triton's handles a missing triton itself)
    assert isinstance(impl, ViterbiBackend)
    for method in PASSES:
        want = [p for p in inspect.signature(getattr(ViterbiBackend, method)).parameters if p != "self"]
        got = list(inspect.signature(getattr(impl, method)).parameters)
        assert got == want, f"{name}.{method}{tuple(got)} != protocol {tuple(want)}"
    assert isinstance(impl.available(), bool)
    assert (impl.unavailable_reason() is None) == impl.available()


def test_an_object_missing_a_pass_is_refused_at_load():
    kernels.register("broken", lambda: object(), devices=None)
    try:
        with pytest.raises(TypeError, match="does not implement ViterbiBackend"):
            kernels.get("broken")
    finally:
        kernels.unregister("broken")


def test_register_rejects_taken_and_reserved_names():
    with pytest.raises(ValueError, match="already registered"):
        kernels.register("cpu", ".cpu", devices=("cpu",))
    with pytest.raises(ValueError, match="other than 'auto'"):
        kernels.register("auto", ".cpu", devices=("cpu",))


# ---- a fake backend selected by name --------------------------------------------------------------------------------


def test_fake_backend_is_selectable_by_name_and_loaded_lazily(fake):
    entry, loads = fake
    assert loads == []  # registering imports nothing
    assert "fake" in V.BACKENDS
    theta, Z, lengths = _case()
    assert V.resolve_backend("auto", theta) != "fake"  # not marked auto
    assert V.resolve_backend("fake", theta) == "fake"
    assert loads == [1]

    kw = dict(lengths=lengths, reg="l2", gamma=0.7)
    for fn in (viterbi_value, viterbi_marginals):
        torch.testing.assert_close(fn(theta, backend="fake", **kw), fn(theta, backend="reference", **kw),
                                   rtol=0, atol=0)
    d, H = viterbi_hvp(theta, Z, backend="fake", **kw)
    d_ref, H_ref = viterbi_hvp(theta, Z, backend="reference", **kw)
    torch.testing.assert_close((d, H), (d_ref, H_ref), rtol=0, atol=0)
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(viterbi_value(th, backend="fake", **kw).sum(), th)  # value' = the backward sweep
    torch.testing.assert_close(g, viterbi_marginals(theta, backend="reference", **kw), rtol=0, atol=0)
    assert set(_Fake.calls) == set(PASSES), _Fake.calls
    assert loads == [1]  # loaded once, then cached

    _Fake.calls.clear()
    with V.viterbi_backend("fake"):
        viterbi_value(theta)
    assert _Fake.calls == ["forward"]
    prev = V.set_default_backend("fake")
    try:
        assert V.resolve_backend(None, theta) == "fake"
    finally:
        V.set_default_backend(prev)
    v = torch.ops.structattn.viterbi_value(theta, None, "entropy", 1.0, "fake")[0]
    torch.testing.assert_close(v, viterbi_value(theta, backend="reference"), rtol=0, atol=0)


def test_fake_backend_through_torch_compile(fake):
    """The name reaches the compiled graph as a constant (resolve_backend's _resolve is baked in by Dynamo)."""
    theta, _, lengths = _case()

    def f(th, lengths):
        return viterbi_marginals(th, lengths, "entropy", 0.5, backend="fake")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(theta, lengths)
    assert "marginals" in _Fake.calls
    torch.testing.assert_close(got, viterbi_marginals(theta, lengths, "entropy", 0.5, backend="reference"),
                               rtol=0, atol=0)


def test_declared_capabilities_give_the_usual_errors(fake):
    theta, _, _ = _case()
    with pytest.raises(TypeError, match=r"backend='fake' supports float64, got torch.float32"):
        V.resolve_backend("fake", theta.float())
    with pytest.raises(ValueError, match="backend='fake' needs a CPU tensor, got device meta"):
        V.resolve_backend("fake", torch.empty(2, 3, 2, 2, device="meta", dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cannot run on meta tensors \(allowed: \('reference',\)\)"):
        V._backend_for(torch.device("meta"), "fake")  # what the ops run first (on meta tensors: the fake kernels)


def test_specialised_fake_and_unavailable_fake():
    class Unavailable(_Fake):
        @staticmethod
        def available():
            return False

        @staticmethod
        def unavailable_reason():
            return "switched off"

    kernels.register("fake3", lambda: _Fake, devices=("cpu",), states=3)
    kernels.register("off", lambda: Unavailable, devices=("cpu",))
    try:
        with pytest.raises(ValueError, match=r"backend='fake3' is specialised to S=3 states, got S=2; use 'auto'"):
            V.resolve_backend("fake3", torch.randn(1, 2, 2, 2))
        assert V.resolve_backend("fake3", torch.randn(1, 2, 3, 3)) == "fake3"
        with pytest.raises(RuntimeError, match="backend='off' is unavailable: switched off"):
            V.resolve_backend("off", torch.randn(1, 2, 2, 2))
    finally:
        kernels.unregister("fake3")
        kernels.unregister("off")


def test_auto_picks_the_first_registered_backend_that_serves_the_call():
    meta = torch.empty(2, 3, 2, 2, device="meta")
    assert V.resolve_backend("auto", meta) == "reference"  # no built-in backend serves meta tensors
    loads = []
    kernels.register("meta_fast", lambda: loads.append(1) or _Fake, devices=("meta",), states=2, auto=True)
    try:
        assert V.resolve_backend("auto", meta) == "meta_fast"
        assert V.resolve_backend("auto", meta.to(torch.float16)) == "reference"  # not a declared dtype
        assert V.resolve_backend("auto", torch.empty(2, 3, 3, 3, device="meta")) == "reference"  # S = 3
        assert V.resolve_backend("auto", torch.randn(2, 3, 2, 2)) in ("cpu", "reference")  # registered earlier
        assert loads == [1]
    finally:
        kernels.unregister("meta_fast")
    assert V.resolve_backend("auto", meta) == "reference"


# ---- errors and imports ---------------------------------------------------------------------------------------------


def test_unknown_name_raises_the_same_value_error_as_before():
    theta = torch.randn(2, 3, 2, 2)
    msg = "backend must be one of ('auto', 'reference', 'cpu', 'triton'), got 'gpu'"
    for call in (lambda: viterbi_value(theta, backend="gpu"), lambda: V.set_default_backend("gpu"),
                 lambda: V.resolve_backend("gpu", theta)):
        with pytest.raises(ValueError) as exc:
            call()
        assert str(exc.value) == msg
    with pytest.raises(ValueError, match="backend must be one of"):
        V.resolve_backend(["cpu"], theta)  # unhashable: still the same error
    with pytest.raises(ValueError, match=r"backend 'gpu' cannot run on cpu tensors"):
        torch.ops.structattn.viterbi_value(theta, None, "entropy", 1.0, "gpu")
    with pytest.raises(AttributeError):
        V.NO_SUCH_THING  # noqa: B018 - the module __getattr__ serves BACKENDS only


def test_import_loads_no_backend_module():
    """``import structattn`` imports neither Triton nor a kernel module (so compiles nothing); resolving "auto" for a
    CPU tensor loads the C kernel module only."""
    code = textwrap.dedent(
        """
        import sys, torch, structattn
        from structattn.ops.viterbi import resolve_backend
        mods = lambda: [m in sys.modules for m in ("triton", "structattn.ops.kernels.triton_viterbi",
                                                    "structattn.ops.kernels.cpu")]
        print(mods())
        resolve_backend("auto", torch.zeros(1, 2, 2, 2))
        print(mods())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[False, False, False]", "[False, False, True]"], proc.stdout
