"""Transforms as ``torch.nn.Module``: ``forward(points) -> points`` on world coordinates (mm).

A transform maps a point x of the common space Ω into the world space of one image or of the
atlas (docs/model.md, "Spaces and coordinates"): samples are pulled back, ``I_i(T_i(x))``.

Every parametric transform has one *parameter slot* (as in deepali), which holds

- an ``nn.Parameter``: learnable (registration by gradient steps);
- a plain tensor: fixed for this module's optimiser (a buffer, moves with ``.to(device)``); its
  autograd history is kept, so gradients still reach whatever computed it;
- a callable returning a tensor: e.g. a network head, evaluated at each use (amortized solvers).

Linear transforms act about a fixed centre c (mm): ``T(x) = A (x − c) + c + t``, so rotations of a
heart in the middle of the field of view do not swing it around the scanner's origin.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from mvmm.core.grid import Grid

ParamValue = Union[nn.Parameter, torch.Tensor, Callable[[], torch.Tensor], None]


class IdentityTransform(nn.Module):
    """The identity map ``T(x) = x``: images are related by their headers only."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Parameters: points ``[..., ndim]`` world mm. Returns the same tensor."""
        return points

    def inverse(self) -> "IdentityTransform":
        return self


class SequentialTransform(nn.Module):
    """Apply transforms one after the other: ``T(x) = T_n(…T_2(T_1(x)))``, the first listed first.

    E.g. ``SequentialTransform(ffd, affine)``: a local deformation in the common space, then the
    global map into the atlas's space.
    """

    def __init__(self, *transforms: nn.Module):
        super().__init__()
        self.steps = nn.ModuleList(transforms)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) through every step."""
        for step in self.steps:
            points = step(points)
        return points

    def inverse(self) -> "SequentialTransform":
        """The inverses of the steps in reverse order (each exact or fixed-point, as the step offers)."""
        return SequentialTransform(*[step.inverse() for step in reversed(self.steps)])


def map_grid(transform: Optional[nn.Module], grid: Grid, device=None, dtype=torch.float32,
             points: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T(x)`` at the voxel centres ``x`` of ``grid``: ``[*grid.shape, ndim]`` world mm
    (``[B, *grid.shape, ndim]`` when a step is batched).

    The same as ``transform(grid.world_points())``, but a first step that offers
    ``grid_displacement(grid)`` (an FFD on a grid of the same direction) is evaluated separably,
    which is what makes non-linear levels affordable on a full image grid. ``points``: the voxel
    centres, when the caller already has them (several transforms on one grid).
    """
    if points is None:
        points = grid.world_points(device=device, dtype=dtype)
    if transform is None:
        return points
    steps = list(transform.steps) if isinstance(transform, SequentialTransform) else [transform]
    displacement = steps[0].grid_displacement(grid) if hasattr(steps[0], "grid_displacement") else None
    batch = next((step.batch_size for step in steps if getattr(step, "batch_size", None) is not None), None)
    if batch is not None and points.dim() == grid.ndim + 1:
        points = points.expand((batch,) + tuple(points.shape))  # B transforms map B copies of the grid
    if displacement is not None:
        # [(B,) ndim, *S] → [(B,) *S, ndim]; a batched deformation gives B maps of the grid
        points = points + displacement.movedim(-grid.ndim - 1, -1).to(points)
        steps = steps[1:]
    for step in steps:
        points = step(points)
    return points


class ParametricTransform(nn.Module):
    """Base of transforms with one parameter slot (see the module docstring).

    Subclasses define ``identity_params()`` (the parameters of the identity map, which also fixes
    their shape ``P``) and call ``_fill_slot(params)`` once their geometry is set. Whatever fills
    the slot must give ``P`` (one transform) or, where the subclass allows a batch, ``[B, *P]``
    (B transforms, e.g. a network head's output for B subjects); the shape is checked at every
    evaluation, so a wrong head fails with a message naming the transform, not inside a matmul.
    """

    batchable = False  # subclasses that accept a leading batch dimension set this

    def _fill_slot(self, params: ParamValue) -> None:
        self._fn = None
        self._param_shape = tuple(self.identity_params().shape)  # fixed by the geometry; checked at each use
        if params is None:
            params = nn.Parameter(self.identity_params())
        if isinstance(params, nn.Parameter):
            self.params_tensor = params
        elif isinstance(params, torch.Tensor):
            self.register_buffer("params_tensor", params)
        elif callable(params):
            self._fn = params
        else:
            raise TypeError(f"params: expected a Parameter, a tensor or a callable, got {type(params).__name__}")
        if self._fn is None:
            self._check_params(self.params_tensor)

    def _check_params(self, value) -> torch.Tensor:
        expected = self._param_shape
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"params: the slot of {type(self).__name__} gave a {type(value).__name__}, "
                            f"expected a tensor of shape {list(expected)}")
        shape = tuple(value.shape)
        if shape == expected or (self.batchable and len(shape) == len(expected) + 1 and shape[1:] == expected):
            return value
        batch = f" or [B, {', '.join(map(str, expected))}]" if self.batchable else ""
        raise ValueError(f"params: {type(self).__name__} ({self.ndim}D) expects parameters of shape "
                         f"{list(expected)}{batch}, got {list(shape)}")

    @property
    def params(self) -> torch.Tensor:
        """The current parameters (evaluating the callable, if the slot holds one), shape-checked."""
        if self._fn is not None:
            return self._check_params(self._fn())
        return self.params_tensor

    @property
    def batch_size(self) -> Optional[int]:
        """B for batched parameters ``[B, *P]``, None for one transform."""
        p = self.params
        return p.shape[0] if p.dim() > len(self._param_shape) else None

    @property
    def learnable(self) -> bool:
        """True when the slot holds an ``nn.Parameter`` that requires a gradient."""
        return self._fn is None and isinstance(self.params_tensor, nn.Parameter) and self.params_tensor.requires_grad

    def identity_params(self) -> torch.Tensor:
        raise NotImplementedError

    def with_params(self, params: ParamValue) -> "ParametricTransform":
        """A transform of the same kind and geometry with ``params`` in its slot (this one unchanged)."""
        raise NotImplementedError


class LinearTransform(ParametricTransform):
    """Base class of transforms ``T(x) = A (x − c) + c + t``; subclasses define A and t from the slot.

    Parameters
    ----------
    ndim : {2, 3}
    params : nn.Parameter, tensor, callable or None
        The parameter slot, shape ``[P]`` for one transform or ``[B, P]`` for B (one per subject);
        None gives a learnable Parameter at the identity.
    center : sequence of float, optional
        Centre c of rotation/scaling in mm (default: the origin), shared by the batch.

    A batched transform maps points ``[B, *S, ndim]``: subject b's points by transform b.
    """

    batchable = True

    def __init__(self, ndim: int, params: ParamValue = None, center: Optional[Sequence[float]] = None):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim: expected 2 or 3, got {ndim}")
        self.ndim = ndim
        self.register_buffer("center", torch.zeros(ndim, dtype=torch.float64) if center is None
                             else torch.as_tensor(center, dtype=torch.float64).reshape(ndim))
        self._fill_slot(params)

    def matrix_and_translation(self):
        """``A [..., ndim, ndim]`` and ``t [..., ndim]`` from the current parameters (``...``: the batch)."""
        raise NotImplementedError

    def affine(self) -> torch.Tensor:
        """Homogeneous ``[..., ndim+1, ndim+1]`` matrix of the map world → world (differentiable)."""
        a, t = self.matrix_and_translation()
        c = self.center.to(device=a.device, dtype=a.dtype)
        offset = c + t - (a @ c.unsqueeze(-1)).squeeze(-1)
        top = torch.cat([a, offset.unsqueeze(-1)], dim=-1)
        bottom = torch.zeros(top.shape[:-2] + (1, self.ndim + 1), dtype=a.dtype, device=a.device)
        bottom[..., 0, self.ndim] = 1
        return torch.cat([top, bottom], dim=-2)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) to world points; batched: ``[B, *S, ndim]``."""
        m = self.affine().to(device=points.device, dtype=points.dtype)
        if m.dim() == 2:
            return points @ m[: self.ndim, : self.ndim].T + m[: self.ndim, self.ndim]
        if points.dim() < 2 or points.shape[0] != m.shape[0]:
            raise ValueError(f"points: a batch of {m.shape[0]} transforms maps points [B, *S, {self.ndim}] with "
                             f"B = {m.shape[0]}, got {list(points.shape)}")
        flat = points.reshape(points.shape[0], -1, self.ndim)
        moved = flat @ m[:, : self.ndim, : self.ndim].transpose(1, 2) + m[:, None, : self.ndim, self.ndim]
        return moved.reshape(points.shape)

    def inverse(self) -> "AffineTransform":
        """The exact inverse, as an affine transform (about the origin) whose parameters keep the
        autograd graph of this one's (gradients flow through the inverse)."""
        return AffineTransform.from_matrix(torch.linalg.inv(self.affine()))

    def compose(self, inner: "LinearTransform") -> "AffineTransform":
        """``self ∘ inner`` (apply ``inner`` first), as an affine transform (gradients kept)."""
        outer = self.affine()
        return AffineTransform.from_matrix(outer @ inner.affine().to(outer))

    def with_params(self, params: ParamValue) -> "LinearTransform":
        return type(self)(self.ndim, params=params, center=self.center)


def rotation_matrix(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rotation ``[..., ndim, ndim]`` from angles in radians ``[..., 1]`` (2D) or ``[..., 3]``
    (3D: about x, then y, then z)."""
    if ndim == 2:
        c, s = torch.cos(angles[..., 0]), torch.sin(angles[..., 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)

    def matrix(rows):
        return torch.stack([torch.stack(row, -1) for row in rows], -2)
    rx = matrix([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    return rz @ ry @ rx


class TranslationTransform(LinearTransform):
    """``T(x) = x + t``; parameters: t in mm, shape [ndim]."""

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(self.ndim, dtype=torch.float64)

    def matrix_and_translation(self):
        t = self.params
        return torch.eye(self.ndim, dtype=t.dtype, device=t.device).expand(t.shape[:-1] + (self.ndim, self.ndim)), t


class RigidTransform(LinearTransform):
    """Rotation about the centre, then translation; parameters ``[angles (rad)…, t (mm)…]``.

    2D: ``[θ, tx, ty]``; 3D: ``[θx, θy, θz, tx, ty, tz]``.
    """

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(1 + 2 if self.ndim == 2 else 3 + 3, dtype=torch.float64)

    def matrix_and_translation(self):
        p = self.params
        n_angles = 1 if self.ndim == 2 else 3
        return rotation_matrix(p[..., :n_angles], self.ndim), p[..., n_angles:]

    def angles_degrees(self) -> torch.Tensor:
        return self.params[..., : 1 if self.ndim == 2 else 3] * (180.0 / math.pi)


class AffineTransform(LinearTransform):
    """General linear map about the centre; parameters ``[A − I (row-major)…, t…]``."""

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(self.ndim * self.ndim + self.ndim, dtype=torch.float64)

    def matrix_and_translation(self):
        p = self.params
        n = self.ndim
        a = torch.eye(n, dtype=p.dtype, device=p.device) + p[..., : n * n].reshape(p.shape[:-1] + (n, n))
        return a, p[..., n * n:]

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> "AffineTransform":
        """A transform from homogeneous ``[..., ndim+1, ndim+1]`` matrices (centre at the origin);
        the parameters keep ``matrix``'s autograd graph."""
        n = matrix.shape[-1] - 1
        linear = matrix[..., :n, :n] - torch.eye(n, dtype=matrix.dtype, device=matrix.device)
        params = torch.cat([linear.reshape(matrix.shape[:-2] + (n * n,)), matrix[..., :n, n]], dim=-1)
        return cls(n, params)


class SliceShiftTransform(nn.Module):
    """Each slice of a stack moved in its own plane: ``T(x) = x − t(s(x))``.

    A short-axis stack is acquired slice by slice, one breath-hold each, so its slices sit a few mm off
    one another in-plane, which no global map of the stack follows. ``s(x)`` is the continuous slice
    index of the world point x on ``grid`` (the stack's own grid) along ``axis``; ``t(s)`` is the
    in-plane shift of slice s, linear between slice centres and held beyond the first and last. The
    shifts lie in the slices' plane, so ``s(x − t) = s(x)`` and the inverse, ``x + t(s(x))``, is exact.

    Parameters
    ----------
    grid : Grid
        The stack's grid (3D): ``T`` maps into its world, as an image's transform does.
    axis : int
        The stack axis (ITK order index of ``grid``'s axes).
    shifts : tensor, shape [grid.size[axis], 3]
        Slice j's content sits at world point y + shifts[j] of the common space (mm); only the
        components in the slice plane are kept.
    """

    def __init__(self, grid: Grid, axis: int, shifts: torch.Tensor):
        super().__init__()
        if grid.ndim != 3 or not 0 <= axis < 3:
            raise ValueError(f"grid, axis: a 3D stack and its axis 0–2, got {grid.ndim}D and {axis}")
        shifts = torch.as_tensor(shifts, dtype=torch.float64)
        if tuple(shifts.shape) != (grid.size[axis], 3):
            raise ValueError(f"shifts: expected shape [{grid.size[axis]}, 3] (one per slice), got {list(shifts.shape)}")
        normal = torch.as_tensor(grid.direction_matrix[:, axis], dtype=torch.float64)
        self.grid, self.axis = grid, axis
        # only the in-plane part: then the slice index of a moved point is its own and the inverse exact
        self.register_buffer("shifts", shifts - (shifts @ normal)[:, None] * normal)

    def shift_at(self, points: torch.Tensor) -> torch.Tensor:
        """``t(s(x))`` for world points ``[..., 3]``: the shift of the slice each point lies on (mm)."""
        index = self.grid.world_to_index(points)[..., self.axis]
        last = self.shifts.shape[0] - 1
        s = index.clamp(0, last)
        low = s.floor().long().clamp(max=max(last - 1, 0))
        frac = (s - low.to(s.dtype)).unsqueeze(-1)
        shifts = self.shifts.to(device=points.device, dtype=points.dtype)
        high = (low + 1).clamp(max=last)
        return shifts[low] * (1 - frac) + shifts[high] * frac

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map common-space points ``[..., 3]`` (mm) into the stack's world."""
        return points - self.shift_at(points)

    def inverse(self) -> "SliceShiftTransform":
        """The exact inverse (the shifts negated)."""
        return SliceShiftTransform(self.grid, self.axis, -self.shifts)
