"""Image geometry: a sampling grid with ITK conventions and explicit coordinate conversions.

Three coordinate systems are used throughout mvmm:

- *index*: continuous voxel index in ITK order ``(x, y[, z])``; voxel centres sit at integers.
- *world*: physical coordinates in mm (LPS, as SimpleITK reports them),
  ``world = origin + direction @ (spacing * index)``.
- *normalised*: ``[-1, 1]`` coordinates as ``torch.nn.functional.grid_sample`` reads them with
  ``align_corners=False`` (the outer faces of the outer voxels sit at ±1).

Tensors hold voxels in the reverse (NumPy/torch) order ``(D, H, W)`` = ``(z, y, x)``; point
tensors hold coordinates in ITK order in their last dimension, which is what ``grid_sample`` wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Tuple

import numpy as np

from mvmm.core.errors import InputError

if TYPE_CHECKING:  # annotations only; torch is imported where it is used
    import torch


# a field of view this many times wider than an atlas's or a network grid's is taken for an uncropped scan
MUCH_WIDER_RATIO = 1.5

@dataclass(frozen=True)
class Grid:
    """A regular sampling grid in physical space.

    Parameters
    ----------
    size : tuple of int, length ndim
        Number of voxels along each axis, ITK order ``(x, y[, z])``.
    spacing : tuple of float, length ndim
        Voxel size in mm along each axis.
    origin : tuple of float, length ndim
        World position (mm) of the centre of voxel ``(0, 0[, 0])``.
    direction : tuple of float, length ndim * ndim
        Direction cosines, row-major, as ``SimpleITK.Image.GetDirection`` returns them.
    """

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    def __post_init__(self):
        ndim = len(self.size)
        if ndim not in (2, 3):
            raise InputError(f"grid: expected 2 or 3 dimensions, got {ndim}")
        if len(self.spacing) != ndim or len(self.origin) != ndim or len(self.direction) != ndim * ndim:
            raise InputError(
                f"grid: size, spacing, origin and direction disagree on the dimension "
                f"(size {self.size}, spacing {self.spacing}, origin {self.origin}, "
                f"{len(self.direction)} direction cosines)"
            )
        if any(int(s) < 1 for s in self.size):
            raise InputError(f"grid: every axis needs at least one voxel, got size {self.size}")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InputError(f"grid: spacing must be positive and finite, got {self.spacing}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            raise InputError(f"grid: direction matrix is singular: {self.direction}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in self.direction))

    # ----------------------------------------------------------------- basic properties
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Tensor shape of an image on this grid, ``(D, H, W)`` or ``(H, W)``."""
        return tuple(reversed(self.size))

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm³ / 1000); for 2D, the pixel area in cm² · 1 mm."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(len(self.size), len(self.size))

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """Homogeneous ``(ndim+1, ndim+1)`` matrix taking an index (ITK order) to world mm."""
        n = self.ndim
        m = np.eye(n + 1)
        m[:n, :n] = self.direction_matrix @ np.diag(self.spacing)
        m[:n, n] = self.origin
        return m

    @property
    def world_to_index_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world_matrix)

    def center_world(self) -> np.ndarray:
        """World position (mm) of the centre of the field of view, shape ``(ndim,)``."""
        centre_index = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return self.index_to_world_matrix[: self.ndim, : self.ndim] @ centre_index + self.origin

    def extent_mm(self) -> np.ndarray:
        """Physical length of the field of view along each axis, shape ``(ndim,)``."""
        return np.asarray(self.size, dtype=np.float64) * np.asarray(self.spacing)

    def much_wider_than(self, other: "Grid", ratio: float = MUCH_WIDER_RATIO) -> bool:
        """Whether this field of view is more than ``ratio`` times ``other``'s (median extents: any
        storage order) — an uncropped scan beside an atlas or a network grid made for crops."""
        return bool(np.median(self.extent_mm()) > ratio * np.median(other.extent_mm()))

    def same_geometry(self, other: "Grid", tol: float = 1e-4) -> bool:
        """True when both grids sample the same points (up to ``tol`` mm / relative)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=tol, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_size(self, size: Sequence[int], spacing: Sequence[float], center_world: Sequence[float]) -> "Grid":
        """A grid with this direction, the given size and spacing, centred at ``center_world``."""
        size = tuple(int(s) for s in size)
        half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
        rot_scale = self.direction_matrix @ np.diag(np.asarray(spacing, dtype=np.float64))
        origin = np.asarray(center_world, dtype=np.float64) - rot_scale @ half
        return Grid(size, tuple(spacing), tuple(origin), self.direction)

    def subgrid(self, low: Sequence[int], high: Sequence[int]) -> "Grid":
        """The voxels ``low`` … ``high`` (inclusive index ranges, ITK order) of this grid, as a grid."""
        low, high = np.asarray(low, dtype=int), np.asarray(high, dtype=int)
        if low.shape != (self.ndim,) or high.shape != (self.ndim,) or np.any(low < 0) or np.any(high < low) \
                or np.any(high >= np.asarray(self.size)):
            raise ValueError(f"subgrid: index range {low.tolist()}…{high.tolist()} is not within size {self.size}")
        origin = self.index_to_world_matrix[: self.ndim] @ np.r_[low.astype(np.float64), 1.0]
        return Grid(tuple(int(x) for x in high - low + 1), self.spacing, tuple(origin), self.direction)

    def moved(self, matrix: np.ndarray) -> "Grid":
        """The same voxels with the header moved by a rigid map: what sat at world x now sits at ``m(x)``.

        ``matrix`` is the homogeneous ``[ndim + 1, ndim + 1]`` matrix of the map (mm).
        """
        m, n = np.asarray(matrix, dtype=np.float64), self.ndim
        origin = m[:n, :n] @ np.asarray(self.origin) + m[:n, n]
        return Grid(self.size, self.spacing, tuple(origin), tuple((m[:n, :n] @ self.direction_matrix).ravel()))

    def resampled(self, spacing, pad: int = 0) -> "Grid":
        """A grid with this direction and centre whose voxels of ``spacing`` mm cover this field of view.

        ``spacing`` is one value (isotropic) or one per axis; ``pad`` extra voxels are added on
        each side (e.g. the control points a cubic B-spline needs beyond the domain).
        """
        spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (self.ndim,))
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InputError(f"spacing: expected positive values in mm, got {spacing.tolist()}")
        size = np.ceil(self.extent_mm() / spacing - 1e-6).astype(int) + 2 * int(pad)
        return self.with_size(np.maximum(size, 1), spacing, self.center_world())

    def coarsened(self, spacing: float) -> "Grid":
        """This grid resampled so that no axis is finer than ``spacing`` mm (itself when none is)."""
        coarse = np.maximum(np.asarray(self.spacing), spacing)
        if np.allclose(coarse, self.spacing):
            return self
        return self.resampled(coarse)

    # ----------------------------------------------------------------- conversions (torch)
    # torch is imported in the methods that use it, so that the command line (and `mvmm evaluate`)
    # can read headers without loading torch.
    def _matrix(self, name: str, like: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.as_tensor(getattr(self, name), dtype=like.dtype, device=like.device)

    def index_to_world(self, index: torch.Tensor) -> torch.Tensor:
        """Map continuous indices ``[..., ndim]`` (ITK order) to world mm ``[..., ndim]``."""
        m = self._matrix("index_to_world_matrix", index)
        return index @ m[: self.ndim, : self.ndim].T + m[: self.ndim, self.ndim]

    def world_to_index(self, world: torch.Tensor) -> torch.Tensor:
        """Map world points ``[..., ndim]`` (mm) to continuous indices ``[..., ndim]``."""
        m = self._matrix("world_to_index_matrix", world)
        return world @ m[: self.ndim, : self.ndim].T + m[: self.ndim, self.ndim]

    def index_to_normalized(self, index: torch.Tensor) -> torch.Tensor:
        """Continuous indices ``[..., ndim]`` to ``grid_sample`` coordinates (align_corners=False)."""
        import torch
        size = torch.as_tensor(self.size, dtype=index.dtype, device=index.device)
        return (2.0 * index + 1.0) / size - 1.0

    def world_to_normalized(self, world: torch.Tensor) -> torch.Tensor:
        return self.index_to_normalized(self.world_to_index(world))

    def contains_index(self, index: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
        """Whether continuous indices ``[..., ndim]`` fall inside the field of view.

        The field of view reaches half a voxel beyond the outer voxel centres (a thick slice
        covers its whole thickness). Returns a bool tensor of shape ``[...]``.
        """
        import torch
        size = torch.as_tensor(self.size, dtype=index.dtype, device=index.device)
        return ((index >= -0.5 - tol) & (index <= size - 0.5 + tol)).all(dim=-1)

    def voxel_indices(self, device=None, dtype=None) -> torch.Tensor:
        """Indices of all voxel centres, ``[*shape, ndim]`` in ITK order (float32 unless ``dtype``)."""
        import torch
        dtype = torch.float32 if dtype is None else dtype
        axes = [torch.arange(n, device=device, dtype=dtype) for n in self.shape]
        zyx = torch.meshgrid(*axes, indexing="ij")
        return torch.stack(tuple(reversed(zyx)), dim=-1)

    def world_points(self, device=None, dtype=None) -> torch.Tensor:
        """World coordinates (mm) of all voxel centres, ``[*shape, ndim]``."""
        return self.index_to_world(self.voxel_indices(device=device, dtype=dtype))

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(d["size"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))
