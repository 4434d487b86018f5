"""Initial placement of a moving image before registration, as SimpleITK's CenteredTransformInitializer.

Transforms map points of the fixed (common) space into the moving space, so the initial
translation is ``centre(moving) − centre(fixed)``, and the linear transform turns about the fixed
centre:

- ``"geometry"``: the centres of the two fields of view;
- ``"moments"``: the intensity-weighted centres of mass (intensities shifted to be ≥ 0);
- ``"header"``: no translation (trust the headers; the scanner's coordinates already relate them).
"""

from __future__ import annotations

import numpy as np
import torch

from mvmm.core.grid import Grid
from mvmm.core.errors import InputError
from mvmm.core.settings import INIT_METHODS  # noqa: F401 (re-exported)
from mvmm.spatial.transforms import AffineTransform, LinearTransform, RigidTransform, TranslationTransform

LINEAR_KINDS = {"translation": TranslationTransform, "rigid": RigidTransform, "affine": AffineTransform}


def weighted_centre(weights: torch.Tensor, grid: Grid) -> np.ndarray:
    """World position (mm) of the mean of ``grid``'s voxels weighted by ``weights [*grid.shape]`` (float64,
    non-negative, with a positive sum), shape ``(ndim,)``."""
    total = float(weights.sum())
    points = grid.world_points(device=weights.device, dtype=torch.float64)
    return ((points * weights.unsqueeze(-1)).reshape(-1, grid.ndim).sum(0) / total).cpu().numpy()


def center_of_mass(data: torch.Tensor, grid: Grid) -> np.ndarray:
    """Intensity-weighted centre (mm) of an image ``[C, *grid.shape]`` (channel 0), shape ``(ndim,)``."""
    weights = data[0].detach().double()
    weights = weights - weights.min()
    if float(weights.sum()) <= 0:
        return grid.center_world()
    return weighted_centre(weights, grid)


def initial_linear_transform(kind: str, fixed_grid: Grid, moving_grid: Grid, method: str = "geometry",
                             fixed_data: torch.Tensor = None, moving_data: torch.Tensor = None) -> LinearTransform:
    """A learnable linear transform of ``kind`` about the fixed centre, translated by ``method``.

    Parameters
    ----------
    kind : {"translation", "rigid", "affine"}
    fixed_grid, moving_grid : Grid
    method : {"header", "geometry", "moments"}
    fixed_data, moving_data : torch.Tensor, shape [C, *grid.shape], optional
        Needed for ``"moments"``.
    """
    if kind not in LINEAR_KINDS:
        raise InputError(f"transform: expected one of {sorted(LINEAR_KINDS)}, got {kind!r}")
    if method not in INIT_METHODS:
        raise InputError(f"initialisation: expected one of {INIT_METHODS}, got {method!r}")
    if method == "moments":
        if fixed_data is None or moving_data is None:
            raise ValueError("initial_linear_transform: 'moments' needs fixed_data and moving_data")
        fixed_centre, moving_centre = center_of_mass(fixed_data, fixed_grid), center_of_mass(moving_data, moving_grid)
    else:
        fixed_centre, moving_centre = fixed_grid.center_world(), moving_grid.center_world()
    transform = LINEAR_KINDS[kind](fixed_grid.ndim, center=fixed_centre)
    if method != "header":
        with torch.no_grad():
            shift = torch.as_tensor(moving_centre - fixed_centre, dtype=transform.params.dtype)
            transform.params[-fixed_grid.ndim:] = shift
    return transform
