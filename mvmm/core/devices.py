"""Choice of the torch device from the user's ``--device auto|cpu|cuda``."""

from __future__ import annotations

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
