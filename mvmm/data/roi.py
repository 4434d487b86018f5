"""The region of interest of a case: the dilated support of the atlas foreground (docs/model.md, Ω_roi).

Cardiac MR fields of view hold far more chest wall, lung and liver than heart; restricting the
likelihood to where the atlas allows a foreground tissue (plus a margin for misplacement and for
anatomy larger than the atlas patients') keeps the background mixture from having to explain the
whole chest, and keeps registration on the heart. Outside the region no image counts, so the
posterior there is the prior: background.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

import torch
import torch.nn.functional as F

from mvmm.core.grid import Grid

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


def region_box(region: torch.Tensor, grid: Grid, target: Grid, margin_mm: float) -> Tuple[np.ndarray, np.ndarray]:
    """The index box of ``target`` that holds ``region`` (on ``grid``) and ``margin_mm`` around it.

    Parameters
    ----------
    region : torch.Tensor, bool, shape [*grid.shape]
        Not empty.
    grid, target : Grid
        Where ``region`` lies; the grid whose box is wanted (any geometry).
    margin_mm : float

    Returns
    -------
    (low, high) : np.ndarray of int, shape (ndim,) each
        Inclusive voxel index range of ``target`` (ITK order), clipped to it.
    """
    index = torch.nonzero(region).cpu().numpy()[:, ::-1].astype(np.float64)  # ITK order
    low, high = index.min(0), index.max(0)
    ndim = grid.ndim
    # every corner of the region's box (half a voxel beyond the outer centres), into target's indices
    corners = np.array(np.meshgrid(*[[lo - 0.5, hi + 0.5] for lo, hi in zip(low, high)], indexing="ij"))
    corners = corners.reshape(ndim, -1).T
    world = (grid.index_to_world_matrix @ np.c_[corners, np.ones(len(corners))].T)[:ndim]
    inside = (target.world_to_index_matrix @ np.r_[world, np.ones((1, world.shape[1]))])[:ndim].T
    pad = margin_mm / np.asarray(target.spacing)
    first = np.clip(np.floor(inside.min(0) - pad), 0, np.asarray(target.size) - 1).astype(int)
    last = np.clip(np.ceil(inside.max(0) + pad), 0, np.asarray(target.size) - 1).astype(int)
    return first, last
