"""The region of interest of a case: the dilated support of the atlas foreground (docs/model.md, Ω_roi).

Cardiac MR fields of view hold far more chest wall, lung and liver than heart; restricting the
likelihood to where the atlas allows a foreground tissue (plus a margin for misplacement and for
anatomy larger than the atlas patients') keeps the background mixture from having to explain the
whole chest, and keeps registration on the heart. Outside the region no image counts, so the
posterior there is the prior: background.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

FOREGROUND_THRESHOLD = 1e-3  # a prior below this is "no foreground" (averaged atlases are never exactly 0)


def dilate_mm(mask: torch.Tensor, spacing_mm: Sequence[float], margin_mm: float) -> torch.Tensor:
    """Dilate a boolean mask by a box of half-width ``margin_mm`` along every axis.

    Parameters
    ----------
    mask : torch.Tensor, bool, shape [*S]
        2D or 3D.
    spacing_mm : sequence of float
        Voxel spacing per tensor axis (the order of ``S``, i.e. reversed world order).
    margin_mm : float
        At least 0; an axis whose spacing exceeds the margin is not dilated along.

    Returns
    -------
    torch.Tensor, bool, shape [*S]
    """
    radius = [int(math.floor(margin_mm / s)) for s in spacing_mm]
    pool = F.max_pool3d if mask.dim() == 3 else F.max_pool2d
    grown = mask[None, None].float()
    for axis, r in enumerate(radius):  # a box is separable: one 1D pass per axis, not one pass of its volume
        if r:
            kernel, padding = [1] * mask.dim(), [0] * mask.dim()
            kernel[axis], padding[axis] = 2 * r + 1, r
            grown = pool(grown, kernel_size=kernel, stride=1, padding=padding)
    return grown[0, 0] > 0


def atlas_roi(prior: torch.Tensor, background_index: int, spacing_mm: Sequence[float],
              margin_mm: float) -> torch.Tensor:
    """Voxels within ``margin_mm`` of where the prior allows a foreground tissue.

    Parameters
    ----------
    prior : torch.Tensor, shape [K, *S]
        Atlas probabilities on a grid.
    background_index : int
    spacing_mm : sequence of float
        Spacing per tensor axis of ``S``.
    margin_mm : float

    Returns
    -------
    torch.Tensor, bool, shape [*S]
    """
    foreground = (1.0 - prior[background_index]) > FOREGROUND_THRESHOLD
    return dilate_mm(foreground.detach(), spacing_mm, margin_mm)
