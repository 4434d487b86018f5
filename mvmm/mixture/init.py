"""Initial parameters: atlas-weighted moments, or k-means when there is no atlas."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from mvmm.mixture.functional import moments, sufficient_statistics
from mvmm.mixture.params import MixtureParams

SUBTYPE_SPREAD = 0.5  # subtypes start at μ ± SUBTYPE_SPREAD σ (evenly spaced in between)
# Levels of one tissue (tied variances, e.g. normal / scar myocardium) start at μ, μ + LEVEL_STEP σ, …:
# a pathology is a bright minority of its tissue, which a symmetric start inside the bulk does not find.
LEVEL_STEP = 2.0


def tissue_weights_from_kmeans(x: torch.Tensor, m: torch.Tensor, n_classes: int, seed) -> torch.Tensor:
    """Hard class weights ``[K, V]`` from k-means, classes ordered by increasing mean of image 0.

    k-means runs on standardised intensities of the voxels that every image covers (image 0 alone if
    fewer than ``50 K`` voxels have them all); other voxels get zero weight. ``x, m``: ``[N, V]``.
    """
    every = m.all(dim=0)
    if int(every.sum()) >= 50 * n_classes:
        used, features = every, x[:, every]
    else:
        used, features = m[0], x[:1, m[0]]
    f = features.T.double().cpu().numpy()
    f = (f - f.mean(0)) / np.maximum(f.std(0), 1e-12)
    rng = np.random.default_rng(seed)
    _, assign = kmeans2(f, n_classes, minit="++", seed=rng)
    order = np.argsort([f[assign == k, 0].mean() if np.any(assign == k) else np.inf for k in range(n_classes)])
    rank = np.empty(n_classes, dtype=np.int64)
    rank[order] = np.arange(n_classes)
    weights = torch.zeros((n_classes, x.shape[1]), dtype=x.dtype, device=x.device)
    cols = torch.nonzero(used).squeeze(1)
    weights[torch.as_tensor(rank[assign], device=x.device), cols] = 1.0
    return weights


def params_from_tissue_weights(x: torch.Tensor, m: torch.Tensor, tissue_weights: torch.Tensor,
                               n_subtypes: np.ndarray, var_floor: torch.Tensor,
                               levels: Optional[np.ndarray] = None) -> MixtureParams:
    """Moments of each image under soft tissue weights, subtypes spread around them (one subject).

    Parameters
    ----------
    x : torch.Tensor, shape [N, V]
    m : torch.Tensor, bool, shape [N, V]
    tissue_weights : torch.Tensor, shape [K, V]
        E.g. the atlas prior, or hard k-means assignments.
    n_subtypes : np.ndarray of int, shape [N, K]
    var_floor : torch.Tensor, float64, shape [N]
    levels : np.ndarray of bool, shape [N, K], optional
        Tissues whose subtypes are levels with one variance (see ``LEVEL_STEP``); the others start
        spread around the tissue's mean.

    Returns
    -------
    MixtureParams
        A batch of one; equal weights within each tissue, equal proportions.
    """
    n_images, n_classes = n_subtypes.shape
    params = MixtureParams.empty(n_subtypes, device=x.device)
    for i in range(n_images):
        w = (tissue_weights * m[i]).reshape(1, n_classes, 1, -1)  # [1, K, 1, V]
        stats = sufficient_statistics(x[i].unsqueeze(0), w)[:, 0, :, 0]  # [3, K]
        mean, var = moments(stats, float(var_floor[i]))
        missing = ~(stats[0] > 0)
        if bool(missing.any()):  # a tissue with no weight in this image: the image's overall moments
            xi = x[i, m[i]].double()
            mean[missing], var[missing] = xi.mean(), torch.clamp(xi.var(), min=float(var_floor[i]))
        for k in range(n_classes):
            c = int(n_subtypes[i, k])
            if levels is not None and levels[i, k]:
                offsets = LEVEL_STEP * torch.arange(c, dtype=torch.float64, device=x.device)
            elif c > 1:
                offsets = torch.linspace(-SUBTYPE_SPREAD, SUBTYPE_SPREAD, c, dtype=torch.float64, device=x.device)
            else:
                offsets = torch.zeros(1, dtype=torch.float64, device=x.device)
            params.means[0, i, k, :c] = mean[k] + offsets * var[k].sqrt()
            params.variances[0, i, k, :c] = var[k]
    return params
