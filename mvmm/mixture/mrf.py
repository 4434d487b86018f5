"""Optional spatial smoothing of the posterior: a Potts model solved by mean-field iterations."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def neighbour_sum(q: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Sum of each voxel's face neighbours, weighted by ``min(spacing) / spacing`` per axis.

    Parameters
    ----------
    q : torch.Tensor, shape [K, *S]
        Maps to sum (zero outside the region of interest).
    spacing : sequence of float, ITK order
        Voxel spacing; neighbours across thick slices count less.

    Returns
    -------
    torch.Tensor, shape [K, *S]
    """
    ndim = q.dim() - 1
    weights = [min(spacing) / s for s in reversed(tuple(spacing))]  # tensor (D, H, W) order
    out = torch.zeros_like(q)
    for axis, w in enumerate(weights, start=1):
        n = q.shape[axis]
        if n < 2:
            continue
        pad = [0, 0] * ndim
        pad[2 * (ndim - axis)] = pad[2 * (ndim - axis) + 1] = 1
        padded = F.pad(q, pad)
        out += w * (padded.narrow(axis, 0, n) + padded.narrow(axis, 2, n))
    return out


def mean_field_potts(log_joint: torch.Tensor, roi: torch.Tensor, beta: float,
                     spacing: Sequence[float], n_iter: int = 5) -> torch.Tensor:
    """Mean-field posterior of a Potts MRF: ``q_kx ∝ exp(log_joint_kx + β Σ_{y~x} q_ky)``.

    Parameters
    ----------
    log_joint : torch.Tensor, shape [K, V]
        ``log π_kx + log p(I(x) | k)`` at the V voxels of the region of interest.
    roi : torch.Tensor, bool, shape [*S]
        The region of interest on the grid; ``roi.sum() == V``.
    beta : float
        Interaction weight (0: no smoothing).
    n_iter : int
        Number of synchronous mean-field updates.

    Returns
    -------
    torch.Tensor, shape [K, V]
        Log of the smoothed posterior.
    """
    log_q = log_joint - torch.logsumexp(log_joint, dim=0, keepdim=True)
    if beta <= 0:
        return log_q
    full = torch.zeros((log_joint.shape[0],) + tuple(roi.shape), dtype=log_joint.dtype, device=log_joint.device)
    for _ in range(n_iter):
        full[:, roi] = log_q.exp()
        field = neighbour_sum(full, spacing)[:, roi]
        updated = log_joint + beta * field
        log_q = updated - torch.logsumexp(updated, dim=0, keepdim=True)
    return log_q
