"""One image with its geometry: the unit that the case, the atlas and the I/O exchange."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from mvmm.data import io
from mvmm.core.grid import Grid
from mvmm.core.errors import InputError
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)

# An image with at most this many distinct values, all integers, is taken for a label map.
MAX_LABEL_VALUES = 16


def looks_like_labels(values: torch.Tensor) -> bool:
    """True when ``values`` hold at most :data:`MAX_LABEL_VALUES` distinct integers (a label map or a
    mask, rather than intensities)."""
    if not bool((values == values.round()).all()):
        return False
    return int(torch.unique(values).numel()) <= MAX_LABEL_VALUES


@dataclass
class Image:
    """Voxel data on a grid.

    Attributes
    ----------
    data : torch.Tensor, shape [C, *grid.shape]
        C channels (1 for an intensity image or a mask).
    grid : Grid
        Geometry of ``data``.
    name : str
        Name used in outputs and messages (e.g. ``"LGE"``).
    source : str
        Where it came from (a file path or a description), for messages.
    """

    data: torch.Tensor
    grid: Grid
    name: str
    source: str = "<memory>"

    def __post_init__(self):
        if self.data.dim() != self.grid.ndim + 1 or tuple(self.data.shape[1:]) != self.grid.shape:
            raise ValueError(f"{self.name}: data shape {list(self.data.shape)} does not match "
                             f"[C, {', '.join(map(str, self.grid.shape))}]")

    @classmethod
    def from_array(cls, array: np.ndarray, grid: Grid, name: str, source: str = "<memory>") -> "Image":
        """Wrap a NumPy array of shape ``grid.shape`` (one channel) as a float32 image."""
        data = torch.as_tensor(np.asarray(array, dtype=np.float32)).unsqueeze(0)
        return cls(data, grid, name, source)

    @classmethod
    def read(cls, path, name: str, argname: str = "images") -> "Image":
        """Read a scalar 2D or 3D image (any format SimpleITK reads) as float32."""
        array, grid, ndim = io.read_array(path, argname)
        if array.ndim != grid.ndim or ndim == 4:
            raise InputError(f"{argname}: {path} is not a scalar 2D/3D image "
                             f"(array shape {array.shape}, {ndim} dimensions)")
        return cls.from_array(array, grid, name, str(path))

    def check_intensities(self, argname: str = "images") -> None:
        """Raise InputError when the image has NaN/Inf values or is one constant value."""
        values = self.data
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InputError(f"{argname}: image {self.name!r} ({self.source}) has {bad} NaN/Inf voxels")
        if float(values.max() - values.min()) == 0.0:
            raise InputError(f"{argname}: image {self.name!r} ({self.source}) has one constant value "
                             f"({float(values.flatten()[0]):g}); nothing can be segmented in it")
        if looks_like_labels(values):
            log.warning("image %r (%s) holds only %d integer values: it looks like a label map, not an "
                        "intensity image (check `%s`)", self.name, self.source,
                        int(torch.unique(values).numel()), argname)

    def reoriented(self, order, flips) -> "Image":
        """This image stored in another axis order and direction, the same voxels at the same world
        positions (:func:`mvmm.data.io.reoriented`; channel 0)."""
        array, grid = io.reoriented(self.data[0].numpy(), self.grid, order, flips)
        return Image.from_array(array, grid, self.name, f"{self.source} (axes {list(order)}, flipped {list(flips)})")

    def to(self, device) -> "Image":
        return Image(self.data.to(device), self.grid, self.name, self.source)

    def sample(self, points: torch.Tensor, transform: Optional[nn.Module] = None,
               mode: str = "linear") -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample at world points ``[*S, ndim]``; returns values ``[C, *S]`` and inside ``[*S]``."""
        return sample_image(self.data.to(points.device), self.grid, points, transform, mode)

    def write(self, path) -> None:
        """Write channel 0 (or all channels as an extra axis) atomically."""
        array = self.data.detach().cpu().numpy()
        io.write_array(path, array[0] if array.shape[0] == 1 else array, self.grid)
