"""The registry of smoothed-Viterbi backends: what a backend implements, what it serves, and how it is found.

A backend is any object (usually a module) with the four passes of :mod:`structattn.ops.viterbi` and two availability
functions — the :class:`ViterbiBackend` protocol. What it can serve (devices, dtypes, number of states S, whether
``backend="auto"`` may pick it, how it lays out its outputs) is declared when it is registered, in a
:class:`BackendSpec`, so that dispatch can rule a backend out *without importing it*: ``import structattn`` must
not import Triton, and no C compiler may run before a CPU tensor asks for the C kernel. The implementation itself is
imported (and checked against the protocol) on first use, then cached.

Adding a backend is one module with the six functions plus one :func:`register` line in
:mod:`structattn.ops.kernels` (``__init__.py``). Registration order is the order in which ``"auto"`` tries the
backends; ``"reference"`` (the plain tensor code) is the fallback when none serves a call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "ViterbiBackend",
    "DTWBackend",
    "OPS",
    "BackendSpec",
    "register",
    "unregister",
    "names",
    "specs",
    "find",
    "spec",
    "get",
]


@runtime_checkable
class ViterbiBackend(Protocol):
    """The four passes of Alg. 3/4 (Mensch & Blondel 2018) on a batch of chains, with identical semantics in every
    backend (see docs/kernels.md for the names of the quantities). Shapes: θ, Z, Q, E, Ė are (B, T, S, S), U is
    (B, T, S), r is (B, S), value and ⟨E, Z⟩ are (B,). ``lengths`` is None (no chain padded) or a (B,) int64 tensor
    already checked to lie in [0, T]; steps t ≥ lengths[b] are padding (Q = E = Ė = 0 there, v and U carried
    through). ``reg`` is "entropy" or "l2", ``gamma`` a float > 0; θ arrives in float32/float64 (or, for a backend
    declaring ``dtypes=None``, any floating dtype). Inputs may be non-contiguous; outputs are new tensors in θ's (or
    Q's) dtype and device, in any strides the backend's :class:`BackendSpec` declares (``chain_minor``)."""

    def forward(self, theta: Tensor, lengths: Tensor | None, reg: str, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
        """Alg. 3 forward: (value = Vit_Ω(θ), Q, r = ∇max_Ω(v_T))."""
        ...

    def marginals(
        self, theta: Tensor, lengths: Tensor | None, reg: str, gamma: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Alg. 3 forward + backward: (value, Q, r, E = ∇Vit_Ω(θ), U)."""
        ...

    def backward(self, Q: Tensor, r: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Alg. 3 backward sweep from a forward's Q, r: (E, U)."""
        ...

    def hvp(
        self, Q: Tensor, U: Tensor, r: Tensor, Z: Tensor, lengths: Tensor | None, reg: str, gamma: float
    ) -> tuple[Tensor, Tensor]:
        """Alg. 4 from Alg. 3's Q, U, r: (⟨E, Z⟩, Ė = ∇²Vit_Ω(θ)·Z)."""
        ...

    def available(self) -> bool:
        """Whether the passes can run in this process (may do one-time work: compile, import)."""
        ...

    def unavailable_reason(self) -> str | None:
        """Why not, or None when available."""
        ...


@runtime_checkable
class DTWBackend(Protocol):
    """The passes of DTW_Ω (ICML 2018 App. B.3, Alg. 5/6) on a batch of pairs; registered with ``op="dtw"``.
    θ, Z, E, Ė are (B, N, M) with N ≤ M (:mod:`structattn.ops.dtw` transposes before calling); ``lengths_x``,
    ``lengths_y`` are (B,) int64 tensors already checked to lie in [1, N] and [1, M]; cells outside them are padding
    (E = Ė = 0 there, their θ never read or ignored). ``saved`` is whatever the backend's forward returns for its own
    backward / HVP (opaque to the caller; memory linear in B·N·M)."""

    def forward(self, theta: Tensor, lengths_x: Tensor, lengths_y: Tensor, reg: str, gamma: float
                ) -> tuple[Tensor, Tensor]:
        """Alg. 5 forward: (value = DTW_Ω(θ), saved)."""
        ...

    def backward(self, theta: Tensor, saved: Tensor, lengths_x: Tensor, lengths_y: Tensor, reg: str,
                 gamma: float) -> Tensor:
        """Alg. 5 backward sweep from a forward's ``saved``: E = ∇DTW_Ω(θ)."""
        ...

    def marginals(self, theta: Tensor, lengths_x: Tensor, lengths_y: Tensor, reg: str, gamma: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Alg. 5 forward + backward: (value, saved, E)."""
        ...

    def hvp(self, theta: Tensor, saved: Tensor, E: Tensor, Z: Tensor, lengths_x: Tensor, lengths_y: Tensor,
            reg: str, gamma: float) -> tuple[Tensor, Tensor]:
        """Alg. 6: (⟨E, Z⟩, Ė = ∇²DTW_Ω(θ)·Z)."""
        ...

    def available(self) -> bool:
        ...

    def unavailable_reason(self) -> str | None:
        ...


#: The operators that have backends, and the protocol (with its method names) each backend must implement.
OPS = {
    "viterbi": (ViterbiBackend, ("forward", "marginals", "backward", "hvp", "available", "unavailable_reason")),
    "dtw": (DTWBackend, ("forward", "backward", "marginals", "hvp", "available", "unavailable_reason")),
}

_FLOAT = (torch.float32, torch.float64)
_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


def _device_name(device_type: str) -> str:
    return _DEVICE_NAMES.get(device_type, device_type)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class BackendSpec:
    """A registered backend: its name, where its implementation lives, and what it serves.

    Attributes:
        name: what ``backend=`` takes.
        loader: ``"module"`` or ``"module:attribute"`` (relative names are relative to this package), imported on
            first use; or a zero-argument callable returning the implementation.
        devices: device types it runs on (``"cpu"``, ``"cuda"``, …), or None for any.
        dtypes: compute dtypes it takes (float16/bfloat16 inputs arrive as float32), or None for any.
        states: the one number of states S it is specialised to, or None for any S.
        interpreter_devices: device types it runs on only through Triton's interpreter (``TRITON_INTERPRET=1``);
            an explicit request is accepted there, ``"auto"`` never picks it there.
        auto: whether ``backend="auto"`` may pick it (the first registered one that serves the call and is
            available wins).
        chain_minor: its per-step outputs (Q, E, U, Ė) are (B, …) views of contiguous (…, B) buffers; the custom
            ops' fake kernels must reproduce these strides.
        op: the operator it implements (a key of :data:`OPS`: ``"viterbi"`` or ``"dtw"``); each operator has its
            own namespace of backend names.
    """

    name: str
    loader: str | Callable[[], Any]
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None = _FLOAT
    states: int | None = None
    interpreter_devices: tuple[str, ...] = ()
    auto: bool = False
    chain_minor: bool = False
    op: str = "viterbi"
    _impl: Any = field(default=None, init=False, repr=False)

    def load(self) -> ViterbiBackend:
        """The implementation (imported on first call, then cached)."""
        impl = self._impl
        if impl is None:
            if callable(self.loader):
                impl = self.loader()
            else:
                module, _, attr = self.loader.partition(":")
                impl = importlib.import_module(module, __package__)
                if attr:
                    impl = getattr(impl, attr)
            protocol, methods = OPS[self.op]
            if not isinstance(impl, protocol):
                missing = [m for m in methods if not callable(getattr(impl, m, None))]
                raise TypeError(f"backend {self.name!r} ({impl!r}) does not implement {protocol.__name__}: "
                                f"missing {missing}")
            self._impl = impl
        return impl

    def runs_on(self, device_type: str, interpreting: bool = True) -> bool:
        """Whether its kernels can run on tensors of ``device_type`` (through the interpreter if ``interpreting``)."""
        return (self.devices is None or device_type in self.devices
                or (interpreting and device_type in self.interpreter_devices))

    def serves(self, device_type: str, dtype: torch.dtype, S: int) -> bool:
        """Whether ``"auto"`` may pick it for such a call (without the interpreter; availability not checked)."""
        return (self.auto and self.runs_on(device_type, interpreting=False)
                and (self.dtypes is None or dtype in self.dtypes) and (self.states is None or S == self.states))

    def check(self, device_type: str, dtype: torch.dtype, S: int, interpreting: bool) -> None:
        """Raise, saying why, if an explicit ``backend=name`` cannot serve such a call: TypeError (dtype),
        ValueError (device, S), RuntimeError (unavailable here)."""
        n = self.name
        if self.dtypes is not None and dtype not in self.dtypes:
            half = " (and half via float32)" if torch.float32 in self.dtypes else ""
            raise TypeError(f"backend={n!r} supports {'/'.join(map(_dtype_name, self.dtypes))}{half}, got {dtype}")
        if not self.runs_on(device_type, interpreting):
            need = f"a {' or '.join(map(_device_name, self.devices))} tensor"
            if self.interpreter_devices:
                other = " or ".join(map(_device_name, self.interpreter_devices))
                need += f" (or a {other} tensor with TRITON_INTERPRET=1)"
            raise ValueError(f"backend={n!r} needs {need}, got device {device_type}")
        if self.states is not None and S != self.states:
            raise ValueError(f"backend={n!r} is specialised to S={self.states} states, got S={S}; "
                             "use 'auto' or 'reference'")
        impl = self.load()
        if not impl.available():
            raise RuntimeError(f"backend={n!r} is unavailable: {impl.unavailable_reason()}")


# One namespace of names per operator; _REGISTRY (the Viterbi one) keeps its name for the code that reads it.
_REGISTRIES: dict[str, dict[str, BackendSpec]] = {op: {} for op in OPS}
_REGISTRY = _REGISTRIES["viterbi"]


def _ns(op: str) -> dict[str, BackendSpec]:
    if op not in _REGISTRIES:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    return _REGISTRIES[op]


def register(
    name: str,
    loader: str | Callable[[], Any],
    *,
    devices: tuple[str, ...] | None,
    dtypes: tuple[torch.dtype, ...] | None = _FLOAT,
    states: int | None = None,
    interpreter_devices: tuple[str, ...] = (),
    auto: bool = False,
    chain_minor: bool = False,
    op: str = "viterbi",
) -> BackendSpec:
    """Register a backend under ``name`` for operator ``op`` (see :class:`BackendSpec` for the arguments); nothing
    is imported yet. Raises ValueError if the name is taken for that operator (or is ``"auto"``)."""
    reg = _ns(op)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in reg:
        raise ValueError(f"backend {name!r} is already registered")
    entry = BackendSpec(name, loader, tuple(devices) if devices is not None else None,
                        tuple(dtypes) if dtypes is not None else None, states, tuple(interpreter_devices), auto,
                        chain_minor, op)
    reg[name] = entry
    return entry


def unregister(name: str, op: str = "viterbi") -> BackendSpec:
    """Remove a registered backend (tests); returns its spec."""
    return _ns(op).pop(name)


def names(op: str = "viterbi") -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_ns(op))


def specs(op: str = "viterbi") -> tuple[BackendSpec, ...]:
    return tuple(_ns(op).values())


def find(name: str, op: str = "viterbi") -> BackendSpec | None:
    """The spec registered as ``name``, or None."""
    return _ns(op).get(name)


def spec(name: str, op: str = "viterbi") -> BackendSpec:
    """The spec registered as ``name`` (KeyError if none)."""
    return _ns(op)[name]


def get(name: str, op: str = "viterbi") -> ViterbiBackend:
    """The implementation registered as ``name``, imported on first use."""
    return _ns(op)[name].load()
