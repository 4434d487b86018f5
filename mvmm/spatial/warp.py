"""Pull-back sampling of an image at world points through ``torch.nn.functional.grid_sample``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mvmm.core.grid import Grid


def sample_image(
    data: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    transform: Optional[nn.Module] = None,
    mode: str = "linear",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample an image at world points, optionally through a transform.

    Parameters
    ----------
    data : torch.Tensor, shape [C, *grid.shape]
        Image values (C channels) on ``grid``.
    grid : Grid
        Geometry of ``data``.
    points : torch.Tensor, shape [*S, ndim]
        World points (mm) of the target, e.g. ``Grid.world_points()`` of the common grid.
    transform : nn.Module, optional
        Maps ``points`` into the world space of ``data`` before sampling (pull-back).
    mode : {"linear", "nearest"}
        Linear for intensities and probabilities, nearest for label maps.

    Returns
    -------
    values : torch.Tensor, shape [C, *S]
        Sampled values; outside the field of view they repeat the border (see ``inside``).
    inside : torch.Tensor, bool, shape [*S]
        Whether each point falls inside ``grid``'s field of view.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode: expected 'linear' or 'nearest', got {mode!r}")
    if data.dim() != grid.ndim + 1 or tuple(data.shape[1:]) != grid.shape:
        raise ValueError(f"data: expected shape [C, {', '.join(map(str, grid.shape))}], got {list(data.shape)}")
    if points.shape[-1] != grid.ndim:
        raise ValueError(f"points: expected {grid.ndim} coordinates per point, got {points.shape[-1]}")
    moved = transform(points) if transform is not None else points
    index = grid.world_to_index(moved)
    inside = grid.contains_index(index)
    target_shape = points.shape[:-1]
    normalized = grid.index_to_normalized(index).to(data.dtype)
    mode = "bilinear" if mode == "linear" else "nearest"
    parts = _cpu_parts(data, normalized)
    if parts > 1:
        # PyTorch's CPU 3D sampler runs one thread per batch entry: the points as `parts` batch
        # entries of one shared (expanded, not copied) volume use every thread, with the same values
        flat = normalized.reshape(-1, grid.ndim)
        n = flat.shape[0]
        pad = -n % parts
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, grid.ndim)])
        batched = flat.reshape(parts, -1, 1, 1, grid.ndim)
        values = F.grid_sample(data.unsqueeze(0).expand(parts, *data.shape), batched, mode=mode,
                               padding_mode="border", align_corners=False)  # [parts, C, n / parts, 1, 1]
        values = values.movedim(1, 0).reshape(data.shape[0], -1)[:, :n].reshape(data.shape[0], *target_shape)
        return values, inside
    values = F.grid_sample(data.unsqueeze(0), normalized.reshape(1, *target_shape, grid.ndim), mode=mode,
                           padding_mode="border", align_corners=False)[0]
    return values, inside


MIN_POINTS_PER_THREAD = 1 << 13  # below this a split costs more than it gains


def _cpu_parts(data: torch.Tensor, normalized: torch.Tensor) -> int:
    """How many batch entries a 3D CPU resampling is split into (1: none)."""
    if data.device.type != "cpu" or normalized.shape[-1] != 3:
        return 1
    points = normalized.numel() // 3
    return max(1, min(torch.get_num_threads(), points // MIN_POINTS_PER_THREAD))
