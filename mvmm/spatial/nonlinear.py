"""Non-linear transforms: cubic B-spline free-form deformation (FFD) and stationary velocity field (SVF).

Both are displacement models ``T(x) = x + u(x)`` on world points (mm), with the parameter slot of
:class:`~mvmm.spatial.transforms.ParametricTransform`, and both are parametrised by cubic B-spline
coefficients ``[ndim, *control.shape]`` (mm, world axes) on control points ``control_spacing`` mm
apart that share the direction of a *domain* grid (the common space) and cover its field of view,
two beyond it on each side (the cubic support). ``refined()`` halves the spacing exactly (B-spline
subdivision), for coarse-to-fine fitting. The slot may also hold a batch ``[B, ndim, *control]``
(B deformations, e.g. a network head's output for B subjects); a batched transform maps points
``[B, *S, ndim]``.

- FFD (Rueckert et al. 1999): the spline is the displacement, ``u = Σ c φ``.
- SVF (as deepali's stationary velocity FFD): the spline is a velocity v, ``T = exp(v)`` by scaling
  and squaring on a dense grid; T is diffeomorphic for a smooth enough v, its inverse is
  ``exp(−v)``. exp(v) is computed once per parameter value and reused (see
  :meth:`StationaryVelocityField.displacement_field`).
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mvmm.core.grid import Grid
from mvmm.spatial.transforms import ParametricTransform, ParamValue

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


def sample_fields(fields: torch.Tensor, grid: Grid, points: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Linearly interpolate vector fields at world points.

    Parameters
    ----------
    fields : torch.Tensor, shape [C, *grid.shape] or [B, C, *grid.shape]
    grid : Grid
    points : torch.Tensor, shape [..., ndim] (one field) or [B, *S, ndim] (a batch)
    padding_mode : {"zeros", "border"}
        Value beyond the grid: zero, or the nearest border value.

    Returns
    -------
    torch.Tensor, shape [..., C] or [B, *S, C]
    """
    batched = fields.dim() == grid.ndim + 2
    data = fields if batched else fields.unsqueeze(0)
    batch = data.shape[0]
    flat = points.reshape(batch, -1, grid.ndim).to(data.dtype)
    normalized = grid.world_to_normalized(flat).reshape((batch,) + (1,) * (grid.ndim - 1) + (-1, grid.ndim))
    values = F.grid_sample(data, normalized, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return values.reshape(batch, data.shape[1], -1).transpose(1, 2).reshape(points.shape[:-1] + (data.shape[1],))


class DisplacementTransform(ParametricTransform):
    """Base of ``T(x) = x + u(x)``; subclasses give ``displacement(points)``."""

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid_displacement(self, grid: Grid) -> Optional[torch.Tensor]:
        """``u`` at the voxel centres of ``grid`` by a faster route than :meth:`displacement`, or None."""
        return None

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) to ``x + u(x)``; batched: ``[B, *S, ndim]``."""
        return points + self.displacement(points)

    def inverse(self, iterations: int = 20) -> "FixedPointInverse":
        """The inverse by fixed-point iteration (valid while the deformation does not fold)."""
        return FixedPointInverse(self, iterations)


class BSplineTransform(DisplacementTransform):
    """Base of the transforms parametrised by cubic B-spline coefficients on a control grid.

    Parameters
    ----------
    domain : Grid
        The space the transform acts on (e.g. the common grid); the control grid covers its field
        of view with its direction.
    control_spacing : float or sequence of float
        Distance between control points in mm (one value or one per axis, ITK order).
    params : Parameter, tensor, callable or None
        Coefficients ``[ndim, *control_grid.shape]`` or ``[B, ndim, *control_grid.shape]`` in mm
        (None: a learnable zero, the identity).
    control_grid : Grid, optional
        Use this control grid instead of deriving it (set by :meth:`refined` and when loading).
    """

    batchable = True

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

    def _geometry(self) -> dict:
        """Keyword arguments that rebuild this transform's geometry (subclasses add theirs)."""
        return {"control_grid": self.control_grid}

    def with_params(self, params: ParamValue) -> "BSplineTransform":
        return type(self)(self.domain, params=params, **self._geometry())

    def spline_at(self, points: torch.Tensor) -> torch.Tensor:
        """The spline at world points ``[..., ndim]`` (batched: ``[B, *S, ndim]``), shaped like them;
        control points beyond the grid count as zero.

        A cubic B-spline is evaluated with 2^ndim linear lookups (``grid_sample``) instead of
        4^ndim gathers: along each axis the four weighted neighbours are two linear interpolations
        at shifted positions (Sigg & Hadwiger, GPU Gems 2, ch. 20).
        """
        coeffs = self.params
        batch = coeffs.shape[0] if coeffs.dim() == self.ndim + 2 else 1
        index = self.control_grid.world_to_index(points.reshape(batch, -1, self.ndim).to(coeffs.dtype))
        floor = torch.floor(index)
        w = cubic_bspline_weights(index - floor)  # [B, P, ndim, 4]
        g0, g1 = w[..., 0] + w[..., 1], w[..., 2] + w[..., 3]
        h0 = floor - 1 + w[..., 1] / g0
        h1 = floor + 1 + w[..., 3] / g1
        data = coeffs.reshape((batch, self.ndim) + self.control_grid.shape)
        out = coeffs.new_zeros((batch, self.ndim, index.shape[1]))
        for upper in itertools.product((False, True), repeat=self.ndim):
            choice = torch.as_tensor(upper, device=index.device)
            position = torch.where(choice, h1, h0)
            weight = torch.where(choice, g1, g0).prod(dim=-1)  # [B, P]
            normalized = self.control_grid.index_to_normalized(position)
            normalized = normalized.reshape((batch,) + (1,) * (self.ndim - 1) + (-1, self.ndim))
            values = F.grid_sample(data, normalized, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = out + values.reshape(batch, self.ndim, -1) * weight.unsqueeze(1)
        return out.transpose(1, 2).reshape(points.shape).to(points.dtype)

    def spline_on(self, grid: Grid) -> Optional[torch.Tensor]:
        """The spline at the voxel centres of ``grid``, ``[(B,) ndim, *grid.shape]`` (mm), or None.

        Where ``grid`` shares the control grid's direction (the common grid, its coarsened or
        resampled versions), the spline is separable along the axes: one small matrix of B-spline
        weights per axis, applied in turn, instead of 2^ndim lookups per point — much faster,
        forward and backward. Returns None for any other grid (use :meth:`spline_at`).
        """
        control = self.control_grid
        to_control = control.world_to_index_matrix @ grid.index_to_world_matrix  # grid index → control index
        scale = np.diag(to_control[: self.ndim, : self.ndim])
        if not np.allclose(to_control[: self.ndim, : self.ndim], np.diag(scale), atol=1e-6):
            return None
        out = self.params
        for axis in range(self.ndim):
            dim = -(axis + 1)  # ITK axis a is the a-th torch dimension from the end
            position = (torch.arange(grid.size[axis], dtype=torch.float64) * scale[axis]
                        + to_control[axis, self.ndim])
            weights = _bspline_matrix(position, control.size[axis]).to(out)
            out = torch.tensordot(out, weights, dims=([dim], [1])).movedim(-1, dim)
        return out

    def refined(self) -> "BSplineTransform":
        """The same transform on control points half as far apart (a new learnable one)."""
        coeffs = self.params.detach()
        for dim in range(-self.ndim, 0):
            coeffs = _subdivide(coeffs, dim)
        g = self.control_grid
        finer = Grid(tuple(2 * s - 1 for s in g.size), tuple(s / 2 for s in g.spacing), g.origin, g.direction)
        return type(self)(self.domain, params=torch.nn.Parameter(coeffs), **{**self._geometry(), "control_grid": finer})


class FreeFormDeformation(BSplineTransform):
    """Cubic B-spline free-form deformation (Rueckert et al. 1999): ``u(x) = Σ c φ(x)``.

    Parameters: see :class:`BSplineTransform`; the coefficients are displacements in mm.
    """

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        """``u(x)`` at world points ``[..., ndim]`` (batched: ``[B, *S, ndim]``)."""
        return self.spline_at(points)

    def grid_displacement(self, grid: Grid) -> Optional[torch.Tensor]:
        """``u`` at the voxel centres of ``grid``, ``[(B,) ndim, *grid.shape]``, separably (or None)."""
        return self.spline_on(grid)


class StationaryVelocityField(BSplineTransform):
    """Diffeomorphism ``T = exp(v)`` of a stationary velocity field v, a cubic B-spline.

    The velocity is evaluated on a dense *field grid* (the domain at ``control spacing /
    field_subdivision`` mm, one voxel beyond it) and integrated there by scaling and squaring,
    ``exp(v) ≈ (id + v / 2^steps)^(2^steps)``; points are then moved by linear interpolation of
    that displacement. As for deepali's SVFFD, the spline keeps v smooth, so its bending energy and
    control spacing mean what they mean for the FFD, and coarse-to-fine refinement is exact in v.

    Parameters
    ----------
    domain, control_spacing, params, control_grid
        As :class:`BSplineTransform`; the coefficients are velocities in mm.
    steps : int
        Squarings.
    field_subdivision : int
        Field-grid voxels per control spacing.
    """

    def __init__(self, domain: Grid, control_spacing: Spacing = 20.0, params: ParamValue = None,
                 control_grid: Grid = None, steps: int = 7, field_subdivision: int = 4):
        super().__init__(domain, control_spacing, params, control_grid)
        if steps < 0 or field_subdivision < 1:
            raise ValueError(f"steps, field_subdivision: expected >= 0 and >= 1, got {steps}, {field_subdivision}")
        self.steps, self.field_subdivision = int(steps), int(field_subdivision)
        self.field_grid = domain.resampled(tuple(s / self.field_subdivision for s in self.control_spacing), pad=1)
        self._cache = None

    def _geometry(self) -> dict:
        return {"control_grid": self.control_grid, "steps": self.steps, "field_subdivision": self.field_subdivision}

    def velocity_field(self) -> torch.Tensor:
        """v at the field grid's voxels, ``[(B,) ndim, *field_grid.shape]`` (mm)."""
        return self.spline_on(self.field_grid)  # same direction as the control grid: always separable

    def displacement_field(self) -> torch.Tensor:
        """``exp(v) − id`` at the field grid's voxels, ``[(B,) ndim, *field_grid.shape]`` (mm).

        Computed once per parameter value and reused: the cache is keyed on the parameter tensor,
        its in-place version (an optimiser step changes it) and the grad mode, and dropped when a
        backward pass goes through it, so a freed graph is never reused. A callable slot (a
        network head) gives a new tensor at each call, hence a new field.
        """
        v = self.params
        grad = torch.is_grad_enabled()
        cached = self._cache
        if cached is not None and cached[0] is v and cached[1] == v._version and cached[2] == grad:
            return cached[3]
        field = self._exponential(v)
        self._cache = (v, v._version, grad, field)
        if field.requires_grad:
            field.register_hook(self._drop_cache)
        return field

    def _drop_cache(self, grad):
        self._cache = None

    def reuse_displacement_field(self, field: torch.Tensor) -> "StationaryVelocityField":
        """Take ``field`` as :meth:`displacement_field` for the current parameters instead of
        integrating them — ``exp(v)`` computed elsewhere for the same deformation (a network's on its
        canonical grid, rotated into a case's world: exp commutes with a rigid map). Dropped, as the
        cache is, when the parameters or the grad mode change. Returns self.

        Parameters
        ----------
        field : torch.Tensor, shape [(B,) ndim, *field_grid.shape]
            Displacements in mm, world axes.
        """
        v = self.params
        expected = tuple(v.shape[:-self.ndim]) + tuple(self.field_grid.shape)
        if tuple(field.shape) != expected:
            raise ValueError(f"field: expected shape {list(expected)} (the field grid), got {list(field.shape)}")
        self._cache = (v, v._version, torch.is_grad_enabled(), field.to(v))
        return self

    def _exponential(self, v: torch.Tensor) -> torch.Tensor:
        field = self.velocity_field() / (2 ** self.steps)
        batched = field.dim() == self.ndim + 2
        points = self.field_grid.world_points(device=v.device, dtype=field.dtype)
        channels = -self.ndim - 1
        for _ in range(self.steps):
            moved = points + field.movedim(channels, -1)
            field = field + sample_fields(field, self.field_grid, moved, "border").movedim(-1, channels)
        return field if batched else field.reshape((self.ndim,) + self.field_grid.shape)

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        """``exp(v)(x) − x`` at world points ``[..., ndim]`` (batched: ``[B, *S, ndim]``)."""
        field = self.displacement_field()
        return sample_fields(field, self.field_grid, points, "border").to(points.dtype)

    def inverse(self) -> "StationaryVelocityField":
        """``exp(−v)``, following this transform's parameters (gradients reach them)."""
        return self.with_params(lambda: -self.params)

    def __getstate__(self):
        # the cached field may hold an autograd graph, which cannot be copied or pickled
        return {**super().__getstate__(), "_cache": None}


class FixedPointInverse(torch.nn.Module):
    """``T⁻¹(y)`` of ``T(x) = x + u(x)`` by iterating ``x ← y − u(x)`` (converges where ``|∇u| < 1``)."""

    def __init__(self, forward_transform: DisplacementTransform, iterations: int = 20):
        super().__init__()
        self.forward_transform = forward_transform
        self.iterations = int(iterations)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``T⁻¹(points)``; gradients reach the forward transform's parameters through a last
        differentiable step ``y − u(x*)`` (first order: the exact gradient also has ``(I + ∇u)⁻¹``)."""
        with torch.no_grad():
            x = points
            for _ in range(self.iterations):
                x = points - self.forward_transform.displacement(x)
        return points - self.forward_transform.displacement(x)

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
        # beyond the grid the border value, as an image sampled through the saved field would be
        return sample_fields(self.displacement_field(), self.grid, points, "border").to(points.dtype)

    def with_params(self, params: ParamValue) -> "DenseDisplacementField":
        return DenseDisplacementField(self.grid, params)
