"""Non-linear transforms: cubic B-spline free-form deformation (FFD) and stationary velocity field (SVF).

Both are displacement models ``T(x) = x + u(x)`` on world points (mm), with the parameter slot of
:class:`~mvmm.spatial.transforms.ParametricTransform`. Their parameters live on a grid that shares
the direction of a *domain* grid (the common space) and covers its field of view:

- FFD: displacement coefficients ``[ndim, *control.shape]`` (mm, world axes) on control points
  ``control_spacing`` mm apart, two beyond the domain on each side (the cubic support);
  ``refined()`` halves the spacing exactly (B-spline subdivision), for coarse-to-fine fitting.
- SVF: a velocity field ``[ndim, *grid.shape]`` (mm, world axes); ``T = exp(v)`` by scaling and
  squaring, so T is diffeomorphic for a smooth enough v and its exact inverse is ``exp(−v)``.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mvmm.core.grid import Grid
from mvmm.spatial.transforms import ParametricTransform, ParamValue
from mvmm.spatial.warp import sample_image

Spacing = Union[float, Sequence[float]]


def cubic_bspline_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of the four control points around fractional positions ``t ∈ [0, 1)``: ``[..., 4]``."""
    t2, t3 = t * t, t * t * t
    return torch.stack([(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6],
                       dim=-1)


def _bspline_matrix(position: torch.Tensor, n_control: int) -> torch.Tensor:
    """Cubic B-spline weights ``[len(position), n_control]`` of control points 0…n−1 at continuous
    control-grid ``position``s (four per row at most; control points beyond the grid count as zero)."""
    floor = torch.floor(position)
    weights = cubic_bspline_weights(position - floor)  # [P, 4]
    columns = floor.long().unsqueeze(-1) + torch.arange(-1, 3)  # [P, 4]
    valid = (columns >= 0) & (columns < n_control)
    matrix = torch.zeros((position.shape[0], n_control + 1), dtype=weights.dtype)
    # out-of-range columns are sent to a spare column and dropped
    matrix.scatter_add_(1, torch.where(valid, columns, torch.full_like(columns, n_control)), weights * valid)
    return matrix[:, :n_control]


def _subdivide(coeffs: torch.Tensor, dim: int) -> torch.Tensor:
    """Cubic B-spline coefficients at half the spacing along ``dim`` (size L → 2L − 1).

    New points at old points get ``(c[i−1] + 6 c[i] + c[i+1]) / 8``, those in between
    ``(c[i] + c[i+1]) / 2``; the spline is unchanged wherever its support lies inside the old grid.
    """
    c = coeffs.movedim(dim, 0)
    padded = torch.cat([torch.zeros_like(c[:1]), c, torch.zeros_like(c[:1])])
    out = c.new_empty((2 * c.shape[0] - 1,) + tuple(c.shape[1:]))
    out[0::2] = (padded[:-2] + 6 * padded[1:-1] + padded[2:]) / 8
    out[1::2] = (c[:-1] + c[1:]) / 2
    return out.movedim(0, dim)


class DisplacementTransform(ParametricTransform):
    """Base of ``T(x) = x + u(x)``; subclasses give ``displacement(points)``."""

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) to ``x + u(x)``."""
        return points + self.displacement(points)

    def inverse(self, iterations: int = 20) -> "FixedPointInverse":
        """The inverse by fixed-point iteration (valid while the deformation does not fold)."""
        return FixedPointInverse(self, iterations)


class FreeFormDeformation(DisplacementTransform):
    """Cubic B-spline free-form deformation (Rueckert et al. 1999) on world coordinates.

    Parameters
    ----------
    domain : Grid
        The space the transform acts on (e.g. the common grid); the control grid covers its field
        of view with its direction.
    control_spacing : float or sequence of float
        Distance between control points in mm (one value or one per axis, ITK order).
    params : Parameter, tensor, callable or None
        Control-point displacements ``[ndim, *control_grid.shape]`` in mm (None: a learnable zero).
    control_grid : Grid, optional
        Use this control grid instead of deriving it (set by :meth:`refined` and when loading).
    """

    def __init__(self, domain: Grid, control_spacing: Spacing = 20.0, params: ParamValue = None,
                 control_grid: Grid = None):
        super().__init__()
        self.domain = domain
        self.ndim = domain.ndim
        self.control_grid = control_grid if control_grid is not None else domain.resampled(control_spacing, pad=2)
        self._fill_slot(params)

    def identity_params(self) -> torch.Tensor:
        return torch.zeros((self.ndim,) + self.control_grid.shape, dtype=torch.float32)

    @property
    def control_spacing(self) -> tuple:
        return self.control_grid.spacing

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        """``u(x)`` at world points ``[..., ndim]``; control points beyond the grid count as zero.

        A cubic B-spline is evaluated with 2^ndim linear lookups (``grid_sample``) instead of
        4^ndim gathers: along each axis the four weighted neighbours are two linear interpolations
        at shifted positions (Sigg & Hadwiger, GPU Gems 2, ch. 20).
        """
        coeffs = self.params
        index = self.control_grid.world_to_index(points.reshape(-1, self.ndim).to(coeffs.dtype))
        floor = torch.floor(index)
        w = cubic_bspline_weights(index - floor)  # [P, ndim, 4]
        g0, g1 = w[..., 0] + w[..., 1], w[..., 2] + w[..., 3]
        h0 = floor - 1 + w[..., 1] / g0
        h1 = floor + 1 + w[..., 3] / g1
        out = coeffs.new_zeros((self.ndim, index.shape[0]))
        for upper in itertools.product((False, True), repeat=self.ndim):
            choice = torch.as_tensor(upper, device=index.device)
            position = torch.where(choice, h1, h0)
            weight = torch.where(choice, g1, g0).prod(dim=-1)
            normalized = self.control_grid.index_to_normalized(position).reshape((1,) * self.ndim + (-1, self.ndim))
            values = F.grid_sample(coeffs.unsqueeze(0), normalized, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)
            out = out + values.reshape(self.ndim, -1) * weight
        return out.T.reshape(points.shape).to(points.dtype)

    def grid_displacement(self, grid: Grid) -> Optional[torch.Tensor]:
        """``u`` at the voxel centres of ``grid``, ``[ndim, *grid.shape]`` (mm), or None.

        Where ``grid`` shares the control grid's direction (the common grid, its coarsened or
        resampled versions), the spline is separable along the axes: one small matrix of B-spline
        weights per axis, applied in turn, instead of 2^ndim lookups per point — much faster,
        forward and backward. Returns None for any other grid (use :meth:`displacement`).
        """
        control = self.control_grid
        to_control = control.world_to_index_matrix @ grid.index_to_world_matrix  # grid index → control index
        scale = np.diag(to_control[: self.ndim, : self.ndim])
        if not np.allclose(to_control[: self.ndim, : self.ndim], np.diag(scale), atol=1e-6):
            return None
        out = self.params
        # torch dim d + 1 of the coefficients is ITK axis ndim - 1 - d
        for d, axis in enumerate(reversed(range(self.ndim))):
            position = (torch.arange(grid.size[axis], dtype=torch.float64) * scale[axis]
                        + to_control[axis, self.ndim])
            weights = _bspline_matrix(position, control.size[axis]).to(out)
            out = torch.tensordot(out, weights, dims=([d + 1], [1])).movedim(-1, d + 1)
        return out

    def refined(self) -> "FreeFormDeformation":
        """The same deformation on control points half as far apart (a new learnable FFD)."""
        coeffs = self.params.detach()
        for dim in range(1, coeffs.dim()):
            coeffs = _subdivide(coeffs, dim)
        g = self.control_grid
        finer = Grid(tuple(2 * s - 1 for s in g.size), tuple(s / 2 for s in g.spacing), g.origin, g.direction)
        return FreeFormDeformation(self.domain, params=torch.nn.Parameter(coeffs), control_grid=finer)


class FixedPointInverse(torch.nn.Module):
    """``T⁻¹(y)`` of ``T(x) = x + u(x)`` by iterating ``x ← y − u(x)`` (converges where ``|∇u| < 1``)."""

    def __init__(self, forward_transform: DisplacementTransform, iterations: int = 20):
        super().__init__()
        self.forward_transform = forward_transform
        self.iterations = int(iterations)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = points
            for _ in range(self.iterations):
                x = points - self.forward_transform.displacement(x)
        return x

    def inverse(self) -> DisplacementTransform:
        return self.forward_transform


class DenseDisplacementField(DisplacementTransform):
    """``T(x) = x + u(x)`` with u sampled (linearly) from a field on a grid, e.g. one read from a file.

    Parameters
    ----------
    grid : Grid
        Geometry of the field.
    params : Parameter, tensor, callable or None
        Displacements ``[ndim, *grid.shape]`` in mm along the world axes (None: a learnable zero).
    """

    def __init__(self, grid: Grid, params: ParamValue = None):
        super().__init__()
        self.grid = grid
        self.ndim = grid.ndim
        self._fill_slot(params)

    def identity_params(self) -> torch.Tensor:
        return torch.zeros((self.ndim,) + self.grid.shape, dtype=torch.float32)

    def displacement_field(self) -> torch.Tensor:
        """u on the grid, ``[ndim, *grid.shape]`` (mm)."""
        return self.params

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        field = self.displacement_field()
        values = sample_image(field, self.grid, points.to(field.dtype))[0]
        return values.movedim(0, -1).to(points.dtype)


class StationaryVelocityField(DenseDisplacementField):
    """Diffeomorphism ``T = exp(v)`` of a stationary velocity field, by scaling and squaring.

    Parameters
    ----------
    domain : Grid
        The space the transform acts on; the velocity grid covers its field of view.
    spacing : float or sequence of float
        Voxel size of the velocity grid in mm.
    params : Parameter, tensor, callable or None
        Velocities ``[ndim, *grid.shape]`` in mm (None: a learnable zero field).
    steps : int
        Squarings: ``exp(v) ≈ (id + v / 2^steps)^(2^steps)``.
    grid : Grid, optional
        Use this velocity grid instead of deriving it from ``domain`` and ``spacing``.
    """

    def __init__(self, domain: Grid, spacing: Spacing = 4.0, params: ParamValue = None, steps: int = 7,
                 grid: Grid = None):
        super().__init__(grid if grid is not None else domain.resampled(spacing), params)
        self.domain = domain
        self.steps = int(steps)

    def displacement_field(self) -> torch.Tensor:
        """``exp(v) − id`` on the velocity grid, ``[ndim, *grid.shape]`` (mm)."""
        v = self.params
        points = self.grid.world_points(device=v.device, dtype=v.dtype)
        disp = v / (2 ** self.steps)
        for _ in range(self.steps):
            moved = points + disp.movedim(0, -1)
            disp = disp + sample_image(disp, self.grid, moved)[0]
        return disp

    def inverse(self) -> "StationaryVelocityField":
        """``exp(−v)``, as a fixed transform."""
        return StationaryVelocityField(self.domain, params=-self.params.detach(), steps=self.steps, grid=self.grid)
