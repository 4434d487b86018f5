"""Where and how wide the work runs: the torch device (``--device auto|cpu|cuda``) and the number of
CPU threads (``--threads``)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from mvmm.core.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for ``cuda`` without CUDA is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device: {name!r} asks for CUDA, which is not available on this machine "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use `device`=cpu")
        return torch.device(name)
    raise InputError(f"device: expected auto, cpu or cuda, got {name!r}")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and job schedulers
    set), not the machine's count: torch's default can oversubscribe a shared machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: Optional[int] = None) -> int:
    """Use ``threads`` CPU threads (default: :func:`available_cores`) for torch's intra-op pool and,
    when threadpoolctl is installed, for NumPy's and SciPy's BLAS/OpenMP pools. Returns the number."""
    threads = int(threads) if threads else available_cores()
    if threads < 1:
        raise InputError(f"threads: expected at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(threads)
    return threads
