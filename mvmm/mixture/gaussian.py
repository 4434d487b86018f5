"""Pure functions for univariate Gaussian subtypes: log-densities and sufficient statistics."""

from __future__ import annotations

import math
from typing import Tuple

import torch

LOG_2PI = math.log(2.0 * math.pi)
_CHUNK = 1 << 20  # voxels per float64 accumulation chunk: bounds memory on large volumes


def subtype_log_densities(x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                          log_weights: torch.Tensor) -> torch.Tensor:
    """``log τ_kc + log N(x; μ_kc, σ²_kc)`` for one image.

    Parameters
    ----------
    x : torch.Tensor, shape [V]
        Intensities of V voxels.
    means, variances, log_weights : torch.Tensor, shape [K, C]
        Subtype parameters of the K tissues in this image (padded subtypes: log weight −inf).

    Returns
    -------
    torch.Tensor, shape [K, C, V]
    """
    means, variances, log_weights = (t.to(x.dtype).unsqueeze(-1) for t in (means, variances, log_weights))
    return log_weights - 0.5 * (LOG_2PI + torch.log(variances) + (x - means) ** 2 / variances)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log Σ exp(x)`` along ``dim`` (dropped); −inf entries allowed, not all of them.

    Written out because ``torch.logsumexp`` is several times slower on CPU when reducing a short,
    non-innermost axis such as the subtype axis of ``[K, C, V]``.
    """
    peak = x.amax(dim=dim, keepdim=True)
    return (peak + (x - peak).exp().sum(dim=dim, keepdim=True).log()).squeeze(dim)


def sufficient_statistics(x: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted zeroth, first and second moments, accumulated in float64.

    Parameters
    ----------
    x : torch.Tensor, shape [V]
    weights : torch.Tensor, shape [K, C, V]

    Returns
    -------
    s0, s1, s2 : torch.Tensor, float64, shape [K, C]
        ``Σ w``, ``Σ w x`` and ``Σ w x²``.
    """
    shape = weights.shape[:-1]
    s = torch.zeros((3,) + tuple(shape), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        xc = x[start:start + _CHUNK].double()
        wc = weights[..., start:start + _CHUNK].double()
        s[0] += wc.sum(-1)
        s[1] += wc @ xc
        s[2] += wc @ (xc * xc)
    return s[0], s[1], s[2]


def weighted_moments(s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                     var_floor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means and variances (floored) from sufficient statistics; entries with ``s0 = 0`` give NaN."""
    means = s1 / s0
    variances = torch.maximum(s2 / s0 - means ** 2, var_floor)
    return means, variances
