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

Local search (ANTs's ``--search-radius``; :func:`searched_atlases`): before the weights, each atlas's image,
labels and coverage at x are taken from the offset o within a few voxels whose window around x + o best matches
the case's window around x (least windowed squared difference of the standardised images), so that a registration
off by a pixel or two there — the slices of a cardiac stack are separate breath-holds — is corrected locally.
The search runs only along the finely sampled axes (the in-plane ones of a stack).

Differences from ANTs: a Gaussian window in mm instead of a box patch in voxels (the slices of cardiac MR are
5–10 times thicker than their pixels), the search in-plane only, and the weights are solved only where the atlases'
labels disagree — where they all agree the weights cannot change the vote. β and α are ANTs's defaults (2 and
0.1); with the window normalised to sum 1, α is relative to a mean of squared differences of unit-variance images
(ANTs adds it to a sum over the patch).
"""

from __future__ import annotations

import itertools
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
# an axis is searched when its voxels are at most this many times the finest axis's (a stack's in-plane axes)
_SEARCHED_AXIS_RATIO = 1.5
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
    box = _box_around(solve, np.ceil(3 * np.asarray(sigma_voxels)).astype(int))
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


def search_radius(spacing: Sequence[float], voxels: int) -> List[int]:
    """The local search's radius per array axis: ``voxels`` along the finely sampled axes (voxel size at most
    1.5 times the finest), 0 along the others (a stack's slice axis)."""
    finest = min(spacing)
    return [int(voxels) if size <= _SEARCHED_AXIS_RATIO * finest else 0 for size in spacing]


def searched_atlases(fixed: np.ndarray, warped: Sequence[dict], radius: Sequence[int],
                     sigma_voxels: Sequence[float]) -> List[dict]:
    """Each atlas with its image, labels and coverage at x taken from x + o, o the offset within ``radius``
    whose window best matches the case's window at x (module notes); where the atlases all agree (no voxel
    within the search's and the window's reach disagrees), nothing moves.

    Parameters
    ----------
    fixed : np.ndarray, shape [*S]
        The case's image.
    warped : sequence of dict
        Each atlas on the case grid: ``image [*S]``, ``labels [K, *S]``, ``inside [*S]`` (bool).
    radius : sequence of int
        The largest offset per array axis, in voxels (:func:`search_radius`).
    sigma_voxels : sequence of float
        The window's standard deviation per array axis, in voxels.

    Returns
    -------
    list of dict
        The atlases, each a new dict with the searched ``image``, ``labels`` and ``inside``.
    """
    radius = [int(r) for r in radius]
    disagree = disagreement(warped)
    if not any(radius) or not disagree.any():
        return [dict(atlas) for atlas in warped]
    box = _box_around(disagree, np.ceil(3 * np.asarray(sigma_voxels)).astype(int) + np.asarray(radius))
    shape = fixed[box].shape
    target = local_standardised(fixed[box], np.ones(shape, bool), sigma_voxels)
    # the zero offset first: a tie keeps the registration's own answer
    offsets = sorted(itertools.product(*[range(-r, r + 1) for r in radius]), key=lambda o: any(o))
    index = np.indices(shape)
    out = []
    for atlas in warped:
        image, inside = atlas["image"][box], atlas["inside"][box] > 0.5
        standardised = local_standardised(image, inside, sigma_voxels)
        best, chosen = np.full(shape, np.inf), np.zeros(shape, dtype=np.int64)
        for k, offset in enumerate(offsets):
            source, valid = _shifted_index(index, offset, shape)
            covered = valid & inside[source]
            difference = np.where(covered, (target - standardised[source]) ** 2, _ABSENT_DIFFERENCE)
            windowed = ndimage.gaussian_filter(difference, sigma_voxels, mode="nearest")
            better = windowed < best
            best[better], chosen[better] = windowed[better], k
        source, valid = _shifted_index(index, np.moveaxis(np.asarray(offsets)[chosen], -1, 0), shape)
        result = {key: np.array(value, copy=True) for key, value in atlas.items()
                  if key in ("image", "labels", "inside")}
        result["image"][box] = image[source]
        result["inside"][box] = inside[source] & valid
        labels = np.asarray(atlas["labels"])[(slice(None),) + box]
        result["labels"][(slice(None),) + box] = labels[(slice(None),) + source]
        out.append({**atlas, **result})
    return out


def _box_around(where: np.ndarray, reach: Sequence[int]) -> tuple:
    """The bounding box of the True voxels of ``where`` grown by ``reach`` voxels per axis (within the array)."""
    found = np.nonzero(where)
    return tuple(slice(max(int(a.min()) - r, 0), min(int(a.max()) + r + 1, size))
                 for a, r, size in zip(found, reach, where.shape))


def _shifted_index(index: np.ndarray, offset, shape: Sequence[int]):
    """The voxel x + ``offset`` for every x of a box (clipped into it) and whether it lies inside; ``offset``: one
    per axis, each an int or an array shaped as the box (a voxel's own offset)."""
    source, valid = [], np.ones(shape, bool)
    for d, o in enumerate(offset):
        moved = index[d] + o
        valid &= (moved >= 0) & (moved < shape[d])
        source.append(np.clip(moved, 0, shape[d] - 1))
    return tuple(source), valid
