"""Joint label fusion (Wang et al., IEEE TPAMI 2013; ANTs ``antsJointFusion``): atlas weights that account for
atlases making the same mistakes.

Locally weighted voting (:func:`mvmm.multi_atlas.local_ncc`) weighs each atlas by how well *it* matches the
case around a voxel; twenty atlases of similar anatomy that all match well and all err the same way then
outvote the one that is right. Joint fusion estimates, around each voxel x, how the atlases' errors
*co-occur*, from their intensity differences with the case,

    M_x(i, j) = ( Σ_y g(y − x) |Ĩ(y) − Ã_i(y)| |Ĩ(y) − Ã_j(y)| )^β,

(g a Gaussian window normalised to sum 1, Ĩ and Ã_i the case and the registered atlas images each
normalised to zero mean and unit variance in the same window, as ANTs normalises its patches), and takes
the weights that minimise the expected squared error of the fused label,

    w_x = (M_x + α I)^{-1} 1 / 1ᵀ (M_x + α I)^{-1} 1,

so that atlases whose errors are correlated share their weight. The weights sum to one and may be
negative (the fused votes are clipped at zero before normalising, :func:`mvmm.multi_atlas.weighted_vote`).

Differences from ANTs: a Gaussian window in mm instead of a box patch in voxels (the slices of cardiac MR are
5–10 times thicker than their pixels), no local patch search (the atlases are already registered
non-linearly), and the weights are solved only where the atlases' labels disagree — where they all agree the
weights cannot change the vote. β and α are ANTs's defaults (2 and 0.1); with the window normalised to sum 1,
α is relative to a mean of squared differences of unit-variance images (ANTs adds it to a sum over the patch).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import torch
from scipy import ndimage

# ANTs antsJointFusion's defaults: the exponent of the error products and the ridge added to M_x
JOINT_FUSION_BETA = 2.0
JOINT_FUSION_ALPHA = 0.1
# an atlas that does not cover a voxel: an intensity difference far above any of unit-variance images, so
# that its weight there is near zero
_ABSENT_DIFFERENCE = 10.0
# two covering atlases "disagree" at a voxel when a class's probability differs by more than this between them
# (linear interpolation leaves soft partial volumes at every edge)
_DISAGREEMENT = 1e-3
# voxels solved at once (M is [N, n, n]: 20 atlases, 50 000 voxels, 160 MB in float64; stored in float32)
_CHUNK = 50_000


def masked_window_mean(mask: np.ndarray, sigma_voxels: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """The mean over the voxels of ``mask`` in a Gaussian window of ``sigma_voxels`` (per array axis) around every
    voxel, as a function of an array shaped as ``mask`` (the local moments of local NCC and of joint fusion)."""
    weight = mask.astype(np.float64)
    norm = np.maximum(ndimage.gaussian_filter(weight, sigma_voxels, mode="constant"), 1e-12)

    def mean(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a * weight, sigma_voxels, mode="constant") / norm

    return mean


def local_standardised(x: np.ndarray, mask: np.ndarray, sigma_voxels: Sequence[float]) -> np.ndarray:
    """``(x − μ) / σ`` with μ, σ the mean and standard deviation of ``x`` over ``mask`` in a Gaussian window of
    ``sigma_voxels`` around every voxel; shape as ``x``."""
    local_mean = masked_window_mean(mask, sigma_voxels)
    x = x.astype(np.float64)
    mean = local_mean(x)
    var = np.maximum(local_mean(x * x) - mean ** 2, 0)
    # a floor against flat windows (a masked-out corner, a background of zeros): 1e-4 of the image's variance
    floor = 1e-4 * float(x[mask].var()) if mask.any() else 0.0
    return (x - mean) / np.sqrt(var + floor + 1e-12)


def disagreement(warped: Sequence[dict]) -> np.ndarray:
    """Voxels where two atlases that cover them give different labels: bool ``[*S]``."""
    low = high = None
    for atlas in warped:
        inside = atlas["inside"] > 0.5
        labels = np.asarray(atlas["labels"], dtype=np.float64)
        this_low, this_high = np.where(inside, labels, np.inf), np.where(inside, labels, -np.inf)
        low = this_low if low is None else np.minimum(low, this_low)
        high = this_high if high is None else np.maximum(high, this_high)
    return ((high - low) > _DISAGREEMENT).any(axis=0)  # (-inf - inf: covered by fewer than two, never True)


def joint_fusion_weights(fixed: np.ndarray, warped: Sequence[dict], sigma_voxels: Sequence[float],
                         beta: float = JOINT_FUSION_BETA, alpha: float = JOINT_FUSION_ALPHA) -> List[np.ndarray]:
    """Each atlas's weight at every voxel (module notes); equal where the atlases agree.

    Parameters
    ----------
    fixed : np.ndarray, shape [*S]
        The case's image.
    warped : sequence of dict
        Each atlas on the case grid: ``image [*S]``, ``labels [K, *S]``, ``inside [*S]`` (bool).
    sigma_voxels : sequence of float
        The window's standard deviation per array axis, in voxels.
    beta, alpha : float
        The exponent of the error products and the ridge of ``M_x``.

    Returns
    -------
    list of np.ndarray, each shape [*S]
        Weights summing to one over the atlases at every voxel (some may be negative).
    """
    n = len(warped)
    weights = [np.full(fixed.shape, 1.0 / n) for _ in range(n)]
    solve = disagreement(warped)
    if n < 2 or not solve.any():
        return weights
    # the bounding box of those voxels and a window's reach (3 σ) around them: all the filters need
    reach = np.ceil(3 * np.asarray(sigma_voxels)).astype(int)
    where = np.nonzero(solve)
    box = tuple(slice(max(int(a.min()) - r, 0), min(int(a.max()) + r + 1, size))
                for a, r, size in zip(where, reach, fixed.shape))
    target = local_standardised(fixed[box], np.ones(fixed[box].shape, bool), sigma_voxels)
    differences = []
    for atlas in warped:
        inside = atlas["inside"][box] > 0.5
        image = local_standardised(atlas["image"][box], inside, sigma_voxels)
        differences.append(np.where(inside, np.abs(target - image), _ABSENT_DIFFERENCE))
    at = np.nonzero(solve[box])
    errors = np.empty((len(at[0]), n, n), dtype=np.float32)
    for i in range(n):
        for j in range(i, n):
            window = ndimage.gaussian_filter(differences[i] * differences[j], sigma_voxels, mode="nearest")[at]
            errors[:, i, j] = errors[:, j, i] = window
    solved = np.empty((errors.shape[0], n))
    for start in range(0, errors.shape[0], _CHUNK):
        chunk = torch.from_numpy(errors[start:start + _CHUNK]).double() ** beta
        chunk = chunk + alpha * torch.eye(n, dtype=chunk.dtype)
        w = torch.linalg.solve(chunk, torch.ones(chunk.shape[0], n, 1, dtype=chunk.dtype))[..., 0]
        solved[start:start + _CHUNK] = (w / w.sum(1, keepdim=True)).numpy()
    for i in range(n):
        weights[i][box][at] = solved[:, i]
    return weights
