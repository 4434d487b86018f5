"""Regularisers and diagnostics of (non-linear) transforms, evaluated on a grid in mm.

Derivatives are central finite differences (``torch.gradient``) along the grid's axes, in mm; they are
differentiable, so the bending energy can be added to a registration loss.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import nn

from mvmm.core.grid import Grid
from mvmm.spatial.nonlinear import BSplineTransform
from mvmm.spatial.transforms import map_grid

log = logging.getLogger(__name__)
# Share of voxels with det ∇T ≤ 0 above which a deformation is reported as folded.
FOLDING_TOLERANCE = 1e-3


def displacement_on(transform: nn.Module, grid: Grid, device=None) -> torch.Tensor:
    """``u(x) = T(x) − x`` at the voxel centres of ``grid``: ``[(B,) ndim, *grid.shape]`` (mm, world axes)."""
    return (map_grid(transform, grid, device) - grid.world_points(device=device)).movedim(-1, -grid.ndim - 1)


def _axis_derivatives(field: torch.Tensor, grid: Grid) -> List[torch.Tensor]:
    """``∂field/∂a`` for each ITK axis a (mm along the axis direction), each shaped like ``field``."""
    spacing = tuple(reversed(grid.spacing))  # torch dim order
    dims = tuple(range(-grid.ndim, 0))  # the trailing spatial dimensions (any batch and components lead)
    if min(grid.shape) < 2:
        raise ValueError(f"grid: derivatives need at least 2 voxels per axis, got shape {grid.shape}")
    by_dim = torch.gradient(field, spacing=spacing, dim=dims)
    return list(reversed(by_dim))  # ITK axis order


def bending_energy(transform: nn.Module, grid: Grid, device=None) -> torch.Tensor:
    """Mean over ``grid`` of ``Σ_c Σ_ab (∂²u_c / ∂a ∂b)²`` (mm⁻²): zero for any affine map.

    Returns a scalar tensor that keeps the autograd graph of the transform's parameters (for a
    batched transform, the mean over the batch too).
    """
    return _bending_of(displacement_on(transform, grid, device), grid)


def spline_bending_energy(deformation: BSplineTransform, grid: Grid) -> torch.Tensor:
    """The bending energy of a B-spline transform's spline on ``grid``: the displacement of an FFD,
    the velocity of an SVF (as deepali regularises its stationary velocity FFD; for small
    deformations exp(v) ≈ id + v, so a weight means the same for both)."""
    field = deformation.spline_on(grid)
    if field is None:
        raise ValueError("grid: must share the direction of the deformation's control grid")
    return _bending_of(field, grid)


def diffusion_energy(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over ``grid`` of ``Σ_c Σ_a (∂u_c / ∂a)²`` of a field ``[(B,) ndim, *grid.shape]`` (mm):
    the ``‖∇u‖²`` smoothness of VoxelMorph and of Dalca et al. 2019 (zero for a translation)."""
    total = u.new_zeros(())
    for derivative in _axis_derivatives(u, grid):
        total = total + (derivative ** 2).sum(dim=-grid.ndim - 1).mean()
    return total


def _bending_of(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean of ``Σ_c Σ_ab (∂²u_c / ∂a ∂b)²`` over a field ``[(B,) ndim, *grid.shape]``."""
    total = u.new_zeros(())
    for first in _axis_derivatives(u, grid):
        for second in _axis_derivatives(first, grid):
            total = total + (second ** 2).sum(dim=-grid.ndim - 1).mean()
    return total


def linear_distortion(transform: nn.Module) -> torch.Tensor:
    """``Σ_i log² σ_i(A)`` over the singular values of a linear transform's matrix A: its scaling and shear.

    Zero for any rigid map, symmetric in growing and shrinking (×2 costs what ×½ costs); a
    prior on the affine part of a registration. Returns a scalar tensor that keeps the autograd
    graph (``svdvals``' gradient is stable also where singular values coincide, as at the identity).
    """
    a, _ = transform.matrix_and_translation()
    return (torch.linalg.svdvals(a).log() ** 2).sum()


def jacobian_determinant(transform: nn.Module, grid: Grid, device=None) -> torch.Tensor:
    """``det ∇T`` at the voxel centres of ``grid``, ``[*grid.shape]`` (1: volume kept, ≤ 0: folding)."""
    with torch.no_grad():
        u = displacement_on(transform, grid, device).double()
        g = torch.stack(_axis_derivatives(u, grid), dim=-1)  # [ndim(c), *S, ndim(a)]: ∂u_c/∂a
        g = g.movedim(0, -2)  # [*S, c, a]
        rot = torch.as_tensor(grid.direction_matrix, dtype=g.dtype, device=g.device)
        # ∂u/∂a is (∇u) R; det(I + ∇u) = det(I + Rᵀ (∇u) R)
        local = rot.T @ g
        eye = torch.eye(grid.ndim, dtype=g.dtype, device=g.device)
        return torch.linalg.det(eye + local)


def jacobian_statistics(transform: nn.Module, grid: Grid, device=None) -> Dict[str, float]:
    """Summary of ``det ∇T`` on ``grid``: share of folding voxels (det ≤ 0), min, max, mean, sd of log."""
    det = jacobian_determinant(transform, grid, device)
    positive = det[det > 0]
    return {"folding_share": float((det <= 0).double().mean()), "min": float(det.min()), "max": float(det.max()),
            "mean": float(det.mean()),
            "log_sd": float(positive.log().std()) if positive.numel() > 1 else float("nan")}


def warn_if_folded(stats: Dict[str, float], what: str) -> None:
    """Log a warning when ``jacobian_statistics`` show folding: such a map is not a plausible anatomy."""
    if stats["folding_share"] > FOLDING_TOLERANCE:
        log.warning("%s folds %.1f%% of the voxels (det of its Jacobian <= 0, minimum %.2f): raise "
                    "`bending_weight`, or use a linear transform", what, 100 * stats["folding_share"], stats["min"])
