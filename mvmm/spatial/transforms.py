"""Transforms as ``torch.nn.Module``: ``forward(points) -> points`` on world coordinates (mm).

A transform maps a point x of the common space Ω into the world space of one image or of the
atlas (DESIGN.md, "Geometry"): samples are pulled back, ``I_i(T_i(x))``.

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
    """``T(x)`` at the voxel centres ``x`` of ``grid``: ``[*grid.shape, ndim]`` world mm.

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
    if displacement is not None:
        points = points + displacement.movedim(0, -1).to(points)
        steps = steps[1:]
    for step in steps:
        points = step(points)
    return points


class ParametricTransform(nn.Module):
    """Base of transforms with one parameter slot (see the module docstring).

    Subclasses define ``identity_params()`` (the parameters of the identity map, which also fixes
    their shape) and call ``_fill_slot(params)`` once their geometry is set.
    """

    def _fill_slot(self, params: ParamValue) -> None:
        self._fn = None
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
        expected = tuple(self.identity_params().shape)
        if self._fn is None and tuple(self.params_tensor.shape) != expected:
            raise ValueError(f"params: expected shape {expected} for {type(self).__name__}, "
                             f"got {tuple(self.params_tensor.shape)}")

    @property
    def params(self) -> torch.Tensor:
        """The current parameters (evaluating the callable, if the slot holds one)."""
        return self._fn() if self._fn is not None else self.params_tensor

    @property
    def learnable(self) -> bool:
        """True when the slot holds an ``nn.Parameter`` that requires a gradient."""
        return self._fn is None and isinstance(self.params_tensor, nn.Parameter) and self.params_tensor.requires_grad

    def identity_params(self) -> torch.Tensor:
        raise NotImplementedError


class LinearTransform(ParametricTransform):
    """Base class of transforms ``T(x) = A (x − c) + c + t``; subclasses define A and t from the slot.

    Parameters
    ----------
    ndim : {2, 3}
    params : nn.Parameter, tensor, callable or None
        The parameter slot; None gives a learnable Parameter at the identity.
    center : sequence of float, optional
        Centre c of rotation/scaling in mm (default: the origin).
    """

    def __init__(self, ndim: int, params: ParamValue = None, center: Optional[Sequence[float]] = None):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim: expected 2 or 3, got {ndim}")
        self.ndim = ndim
        self.register_buffer("center", torch.zeros(ndim, dtype=torch.float64) if center is None
                             else torch.as_tensor(center, dtype=torch.float64).reshape(ndim))
        self._fill_slot(params)

    def matrix_and_translation(self):
        """``A [ndim, ndim]`` and ``t [ndim]`` from the current parameters."""
        raise NotImplementedError

    def affine(self) -> torch.Tensor:
        """Homogeneous ``[ndim+1, ndim+1]`` matrix of the map world → world."""
        a, t = self.matrix_and_translation()
        c = self.center.to(a.dtype).to(a.device)
        m = torch.eye(self.ndim + 1, dtype=a.dtype, device=a.device)
        m[: self.ndim, : self.ndim] = a
        m[: self.ndim, self.ndim] = c + t - a @ c
        return m

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) to world points ``[..., ndim]``."""
        m = self.affine().to(device=points.device, dtype=points.dtype)
        return points @ m[: self.ndim, : self.ndim].T + m[: self.ndim, self.ndim]

    def inverse(self) -> "AffineTransform":
        """The exact inverse, as a fixed affine transform (about the origin)."""
        inv = torch.linalg.inv(self.affine().detach())
        return AffineTransform.from_matrix(inv)

    def compose(self, inner: "LinearTransform") -> "AffineTransform":
        """``self ∘ inner`` (apply ``inner`` first), as a fixed affine transform."""
        outer = self.affine().detach()
        m = outer @ inner.affine().detach().to(outer.dtype)
        return AffineTransform.from_matrix(m)


def rotation_matrix(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rotation from angles in radians: one angle in 2D; three (about x, then y, then z) in 3D."""
    if ndim == 2:
        c, s = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, cx, -sx]), torch.stack([zero, sx, cx])])
    ry = torch.stack([torch.stack([cy, zero, sy]), torch.stack([zero, one, zero]), torch.stack([-sy, zero, cy])])
    rz = torch.stack([torch.stack([cz, -sz, zero]), torch.stack([sz, cz, zero]), torch.stack([zero, zero, one])])
    return rz @ ry @ rx


class TranslationTransform(LinearTransform):
    """``T(x) = x + t``; parameters: t in mm, shape [ndim]."""

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(self.ndim, dtype=torch.float64)

    def matrix_and_translation(self):
        t = self.params
        return torch.eye(self.ndim, dtype=t.dtype, device=t.device), t


class RigidTransform(LinearTransform):
    """Rotation about the centre, then translation; parameters ``[angles (rad)…, t (mm)…]``.

    2D: ``[θ, tx, ty]``; 3D: ``[θx, θy, θz, tx, ty, tz]``.
    """

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(1 + 2 if self.ndim == 2 else 3 + 3, dtype=torch.float64)

    def matrix_and_translation(self):
        p = self.params
        n_angles = 1 if self.ndim == 2 else 3
        return rotation_matrix(p[:n_angles], self.ndim), p[n_angles:]

    def angles_degrees(self) -> torch.Tensor:
        return self.params[: 1 if self.ndim == 2 else 3] * (180.0 / math.pi)


class AffineTransform(LinearTransform):
    """General linear map about the centre; parameters ``[A − I (row-major)…, t…]``."""

    def identity_params(self) -> torch.Tensor:
        return torch.zeros(self.ndim * self.ndim + self.ndim, dtype=torch.float64)

    def matrix_and_translation(self):
        p = self.params
        n = self.ndim
        return torch.eye(n, dtype=p.dtype, device=p.device) + p[: n * n].reshape(n, n), p[n * n:]

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> "AffineTransform":
        """A fixed transform from a homogeneous ``[ndim+1, ndim+1]`` matrix (centre at the origin)."""
        n = matrix.shape[0] - 1
        params = torch.cat([(matrix[:n, :n] - torch.eye(n, dtype=matrix.dtype, device=matrix.device)).reshape(-1),
                            matrix[:n, n]])
        return cls(n, params)
