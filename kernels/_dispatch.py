"""Backend selection for the fused operators, decided at call time.

    ALBEF_KERNELS=auto|triton|torch     (environment; default auto)
    with use_backend("torch"): ...       (tests and benchmarks)
    configure("auto", disable={"itc_loss"})   (from the training config)

`enabled(op, *tensors)` (public as `albef_kernels.enabled`; `use_triton` is the same and logs) is
True when the backend is not "torch", the op is not disabled, Triton imports, and the tensors live on
a CUDA device. Under `TRITON_INTERPRET=1` (how CI runs kernels on the CPU) a forced
`use_backend("triton")` also accepts CPU tensors; `auto` never sends CPU tensors to the interpreter.
The first decision per op is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger("albef_kernels")
_BACKENDS = ("auto", "triton", "torch")
OPS = ("itc_loss", "sample_hard_negatives", "ema", "mlm_loss")  # the names use_triton() is asked about
_override: str | None = None
_configured = "auto"
_disabled: set[str] = set()
_logged: set[tuple[str, bool]] = set()


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_IMPORTS = _import_triton()  # decided once at import (a constant for torch.compile's tracer)


def triton_available() -> bool:
    return _TRITON_IMPORTS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend() -> str:
    name = _override or os.environ.get("ALBEF_KERNELS") or _configured
    if name not in _BACKENDS:
        raise ValueError(f"ALBEF_KERNELS={name!r} is not one of {_BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block (tests, benchmarks)."""
    global _override
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {_BACKENDS}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def configure(backend_name: str = "auto", disable: Iterable[str] = ()) -> None:
    """Set the backend used when ALBEF_KERNELS is unset, and the ops routed to their PyTorch reference
    whatever the backend (from the training config)."""
    global _configured
    if backend_name not in _BACKENDS:
        raise ValueError(f"kernel backend {backend_name!r} is not one of {_BACKENDS}")
    unknown = sorted(set(disable) - set(OPS))
    if unknown:
        raise ValueError(f"kernels.disable names unknown ops {unknown}; valid: {list(OPS)}")
    _configured = backend_name
    _disabled.clear()
    _disabled.update(disable)


def enabled(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` takes its Triton kernel (True) or its PyTorch path (False) on these tensors, by the
    dispatch rules above; logs nothing. Without tensors: whether the op is switched on at all (backend
    not "torch", op not disabled, Triton importable), i.e. what CUDA tensors would get. An op may still
    run its PyTorch path for inputs outside its kernel's envelope (dtype, size); for the ITC,
    `albef_kernels.itc_loss_path` gives the exact path of given inputs.

    Args:
        op: one of OPS.
        tensors: the op's tensor inputs (any number).
    """
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; valid: {list(OPS)}")
    name = backend()
    if name == "torch" or op in _disabled or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return name == "triton" and interpreting()


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """`enabled(op, *tensors)`, logging the first decision of each kind per op."""
    choice = enabled(op, *tensors)
    if (op, choice) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, choice))
        log.info("%s: %s", op, "triton" if choice else "torch reference")
    return choice
