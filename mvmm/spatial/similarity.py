"""Image similarity losses for pairwise and group-wise registration (lower is better).

Each loss compares a fixed image with a moving image sampled on the same grid, over a mask of
voxels where both are defined (the moving image's field of view), and is differentiable in the
moving values:

- ``ssd``: mean squared difference (summed over channels), divided by the fixed image's variance
  so that its scale does not depend on the intensity units; for one-hot label maps it is the
  label-overlap SSD of group-wise atlas building.
- ``ncc``: minus the local normalised cross-correlation in a box window (VoxelMorph's loss),
  robust to smooth intensity changes; one modality or similar contrasts.
- ``mi``: minus the mutual information from a Parzen-window joint histogram (Mattes et al. 2001,
  cubic B-spline windows); different modalities (e.g. LGE against bSSFP).
- ``dice``: one minus the mean soft Dice over channels 1.. (channel 0 is background) of
  probability or one-hot maps.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mvmm.core.errors import InputError
from mvmm.core.settings import METRICS  # noqa: F401 (re-exported)
from mvmm.spatial.nonlinear import cubic_bspline_weights

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def ssd(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` of ``Σ_c (f − m)²`` over the fixed image's variance.

    Parameters
    ----------
    fixed, moving : torch.Tensor, shape [C, *S]
    mask : torch.Tensor, bool, shape [*S]
    """
    with torch.no_grad():
        scale = sum(float(fixed[c][mask].var()) if int(mask.sum()) > 1 else 0.0 for c in range(fixed.shape[0]))
    return _masked_mean(((fixed - moving) ** 2).sum(0), mask) / max(scale, 1e-12)


def local_ncc(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Minus the mean over ``mask`` of the squared local correlation in a ``window``-voxel box.

    The squared correlation (as VoxelMorph) makes the loss indifferent to contrast inversion
    between sequences; ``window`` is clipped to each axis's size.
    """
    ndim = fixed.dim() - 1
    # odd, so the window is centred, and no longer than the axis (pooling refuses a longer window: a
    # stack of 8 slices gets 7, not 9)
    kernel = [max(min(window, n) - (1 - min(window, n) % 2), 1) for n in fixed.shape[1:]]
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    pad = [k // 2 for k in kernel]

    def local_mean(x):
        # a box is separable, and so is its count of in-image voxels at the borders: one 1D pass per
        # axis costs the sum of the window's sides instead of their product (9 + 9 + 9, not 9³)
        x = x.unsqueeze(0)
        for axis in range(ndim):
            if kernel[axis] > 1:
                size, padding = [1] * ndim, [0] * ndim
                size[axis], padding[axis] = kernel[axis], pad[axis]
                x = pool(x, size, stride=1, padding=padding, count_include_pad=False)
        return x[0]

    f, m = fixed, moving
    mu_f, mu_m = local_mean(f), local_mean(m)
    cov = local_mean(f * m) - mu_f * mu_m
    var_f = (local_mean(f * f) - mu_f ** 2).clamp_min(0)
    var_m = (local_mean(m * m) - mu_m ** 2).clamp_min(0)
    eps = 1e-5 * (float(f.var()) + 1e-12)
    cc = (cov * cov / (var_f * var_m + eps)).mean(0)
    return -_masked_mean(cc, mask)


def _bspline_parzen(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """Cubic B-spline Parzen weights ``[N, bins]`` of values ``[N]`` (Mattes: 2 padding bins each side)."""
    x = 2.0 + ((values - low) / max(high - low, 1e-12)).clamp(0, 1) * (bins - 5 - 1e-4)
    base = torch.floor(x.detach())
    weights = cubic_bspline_weights(x - base)  # [N, 4] for bins base-1 .. base+2
    index = base.long().unsqueeze(1) + torch.arange(-1, 3, device=values.device)
    return torch.zeros(values.shape[0], bins, dtype=values.dtype, device=values.device).scatter(1, index, weights)


def _percentile_range(values: torch.Tensor) -> list:
    qs = torch.tensor([0.005, 0.995], device=values.device, dtype=values.dtype)
    return torch.quantile(_subsample(values), qs).tolist()


class MutualInformation:
    """Minus the mutual information (nats) of channel 0, from a Parzen-window joint histogram.

    As Mattes MI: cubic B-spline Parzen windows on ``bins`` bins, intensity ranges (0.5 and 99.5
    percentiles inside the mask) fixed at the first evaluation. The fixed image's windows are
    kept between calls (the fixed values do not change during a registration).
    """

    def __init__(self, bins: int = 32):
        self.bins = bins
        self._ranges = None
        self._fixed_key, self._fixed_weights = None, None

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f_all, m = fixed[0].reshape(-1), moving[0][mask]
        flat_mask = mask.reshape(-1)
        if m.numel() < 2:
            return fixed.new_zeros(()) + 0.0 * moving.sum()
        if self._ranges is None:
            with torch.no_grad():
                self._ranges = (_percentile_range(f_all[flat_mask]), _percentile_range(m.detach()))
        key = (f_all.data_ptr(), f_all.numel(), f_all.device)
        if key != self._fixed_key:
            self._fixed_key, self._fixed_weights = key, _bspline_parzen(f_all.detach(), *self._ranges[0], self.bins)
        wf = self._fixed_weights[flat_mask]
        wm = _bspline_parzen(m, *self._ranges[1], self.bins)
        joint = wf.T @ wm / m.numel()
        pf, pm = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
        tiny = 1e-12
        return -(joint * (torch.log(joint + tiny) - torch.log(pf @ pm + tiny))).sum()


def mutual_information(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Minus the mutual information (nats) of channel 0 of both images over ``mask`` (one call)."""
    return MutualInformation(bins)(fixed, moving, mask)


def _subsample(values: torch.Tensor, limit: int = 1_000_000) -> torch.Tensor:
    """At most ``limit`` evenly spread values (``torch.quantile`` refuses very large inputs)."""
    step = max(1, values.numel() // limit)
    return values[::step]


def soft_dice(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One minus the mean soft Dice over channels 1.. of probability maps ``[K, *S]`` over ``mask``."""
    if fixed.shape[0] < 2:
        raise InputError("metric 'dice': needs probability or one-hot maps with a background channel and "
                         "at least one structure")
    weight = mask.to(fixed.dtype)
    f, m = fixed[1:] * weight, moving[1:] * weight
    dims = tuple(range(1, f.dim()))
    dice = 2 * (f * m).sum(dims) / (f.sum(dims) + m.sum(dims)).clamp_min(1e-6)
    return 1 - dice.mean()


def similarity_loss(metric: str, bins: int = 32, window: int = 9) -> Loss:
    """The loss function ``(fixed [C, *S], moving [C, *S], mask [*S]) → scalar`` named ``metric``."""
    if metric == "ssd":
        return ssd
    if metric == "ncc":
        return lambda f, m, mask: local_ncc(f, m, mask, window)
    if metric == "mi":
        return MutualInformation(bins)
    if metric == "dice":
        return soft_dice
    raise InputError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")


def check_mask(mask: torch.Tensor, what: str, minimum: int = 32) -> None:
    """Raise InputError when the images overlap on fewer than ``minimum`` voxels."""
    count = int(mask.sum())
    if count < minimum:
        raise InputError(f"{what}: the images overlap on {count} voxels of the fixed grid; place them closer "
                         f"(another `init`) or check their headers")


__all__ = ["METRICS", "ssd", "local_ncc", "mutual_information", "MutualInformation", "soft_dice", "similarity_loss", "check_mask"]
