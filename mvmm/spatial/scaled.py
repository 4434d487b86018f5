"""Transforms with parameters in millimetres of motion, for coarse-to-fine optimisation.

Angles and matrix entries are multiplied by the radius of the field of view, so that a unit change
of any raw parameter moves the anatomy by about a millimetre: one Adam step length fits them all.
A level starts from a fixed transform (``base``) and learns a zero-initialised offset (``raw``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mvmm.core.grid import Grid
from mvmm.spatial.nonlinear import FreeFormDeformation
from mvmm.spatial.transforms import AffineTransform, LinearTransform, RigidTransform

LINEAR_LEVEL_KINDS = ("rigid", "affine")


class ScaledLinear:
    """A learnable rigid or affine transform, continuing from ``start``, with raw parameters in mm.

    Attributes
    ----------
    raw : nn.Parameter
        The learnable offset (zero at start), in mm of motion.
    module : LinearTransform
        The transform to use in the objective; its parameters are ``base + raw * scales``.
    """

    def __init__(self, kind: str, start: LinearTransform, radius: float):
        ndim = start.ndim
        self.kind, self.ndim, self.center = kind, ndim, start.center
        base = as_kind(start, kind).params.detach()
        n_linear = base.numel() - ndim
        self.scales = torch.cat([torch.full((n_linear,), 1.0 / radius), torch.ones(ndim)]).to(base)
        self.base = base
        self.raw = nn.Parameter(torch.zeros_like(base))
        cls = RigidTransform if kind == "rigid" else AffineTransform
        self.module = cls(ndim, params=lambda: self.base + self.raw * self.scales, center=self.center)

    def baked(self) -> LinearTransform:
        """The current transform with fixed parameters."""
        cls = RigidTransform if self.kind == "rigid" else AffineTransform
        return cls(self.ndim, params=(self.base + self.raw * self.scales).detach().clone(), center=self.center)


def as_kind(transform: LinearTransform, kind: str) -> LinearTransform:
    """``transform`` as a fixed transform of ``kind`` about the same centre (rigid → affine is exact)."""
    if kind == "rigid":
        if not isinstance(transform, RigidTransform):
            raise ValueError("a non-rigid linear transform cannot be made rigid")
        return transform
    a, t = transform.matrix_and_translation()
    n = transform.ndim
    params = torch.cat([(a - torch.eye(n, dtype=a.dtype, device=a.device)).reshape(-1), t]).detach()
    return AffineTransform(n, params=params, center=transform.center)


def learnable_ffd(previous: Optional[FreeFormDeformation], domain: Grid, control_spacing: float,
                  device=None) -> FreeFormDeformation:
    """A learnable FFD for the next level: new (identity), refined to half the spacing, or continued."""
    if previous is None:
        return FreeFormDeformation(domain, control_spacing).to(device)
    if min(previous.control_spacing) > control_spacing:
        return previous.refined()
    return FreeFormDeformation(domain, params=nn.Parameter(previous.params.detach().clone()),
                               control_grid=previous.control_grid)


def frozen_ffd(ffd: FreeFormDeformation, domain: Grid) -> FreeFormDeformation:
    """``ffd`` with its current parameters fixed."""
    return FreeFormDeformation(domain, params=ffd.params.detach().clone(), control_grid=ffd.control_grid)


def linear_then_ffd_levels(kind: str, control_spacing: float, ffd_levels: int) -> list:
    """Coarse-to-fine schedule for a transform ``kind``: rigid → affine → FFD at halving spacings.

    Returns a list of ``(level kind, control spacing or None)``.
    """
    levels = [("rigid", None)]
    if kind in ("affine", "ffd"):
        levels.append(("affine", None))
    if kind == "ffd":
        levels += [("ffd", control_spacing / 2 ** i) for i in range(ffd_levels)]
    return levels
