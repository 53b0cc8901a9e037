"""Backend selection for the fused operators, decided at call time.

    ALBEF_KERNELS=auto|triton|torch     (environment; default auto)
    with use_backend("torch"): ...       (tests and benchmarks)
    configure("auto", disable={"itc_loss"})   (from the training config)

`use_triton(op, *tensors)` is True when the backend is not "torch", the op is not disabled, Triton
imports, and the tensors live on a CUDA device. Under `TRITON_INTERPRET=1` (how CI runs kernels on
the CPU) a forced `use_backend("triton")` also accepts CPU tensors; `auto` never sends CPU tensors to
the interpreter. The first decision per op is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache

import torch

log = logging.getLogger("albef_kernels")
_BACKENDS = ("auto", "triton", "torch")
OPS = ("itc_loss", "sample_hard_negatives", "ema", "mlm_loss")  # the names use_triton() is asked about
_override: str | None = None
_configured = "auto"
_disabled: set[str] = set()
_logged: set[tuple[str, bool]] = set()


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    name = backend()
    if name == "torch" or op in _disabled or not triton_available():
        choice = False
    elif all(t.is_cuda for t in tensors):
        choice = True
    else:
        choice = name == "triton" and interpreting()
    if (op, choice) not in _logged:
        _logged.add((op, choice))
        log.info("%s: %s", op, "triton" if choice else "torch reference")
    return choice
