"""The Chan–Vese CNN of Chen & Frey (MIDL 2020), on mvmm's likelihood: a network that predicts the
soft segmentation P directly and is trained, without labels, by the active-contour-without-edges
energy (Chan & Vese 2001) — vector-valued (several sequences), multiphase (K classes), optionally
with the atlas as a prior and a label loss on a few labelled cases (the paper's semi-supervised
setting).

The energy of a case, per voxel of its region Ω (docs/nets.md, "Chan–Vese CNN")::

    E(P) = (1/|Ω|) Σ_{x∈Ω} Σ_k P_kx [ −log p(I(x) | k; θ(P)) − c(x) − log π_kx ]
           + ν (1/|Ω|) Σ_{x∈Ω} ½ Σ_k |∇P_kx|
           (+ λ_label · cross-entropy on labelled voxels)

θ(P) is the closed-form M-step of the mixture under P (:func:`mvmm.mixture.functional.m_step`):
the means are Chan–Vese's region constants ``c_ik = Σ_x M_i P_kx I_i / Σ_x M_i P_kx``. With
``variances="equal"`` every σ² is ½, so that ``−log p(I | k) − c(x) = Σ_i M_i (I_i − c_ik)²``
(c(x) = Σ_i M_i ½ log π, the constant of the Gaussian), the Chan–Vese region term; with an atlas,
π_kx is the placed atlas's prior (:func:`mvmm.mixture.functional.log_prior`), else the term is a
constant and left out. The density is the functional core's
:func:`~mvmm.mixture.functional.tissue_log_likelihood` — the mixture EM fits, in its two-class,
equal-variance, hard-assignment limit (a test shows the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mvmm.core.grid import Grid
from mvmm.core.settings import AcweNetSettings
from mvmm.mixture.functional import labelled_cross_entropy, log_prior, m_step, masked_mean, tissue_log_likelihood
from mvmm.mixture.model import log_of_prior
from mvmm.mixture.params import MixtureParams
from mvmm.nets.data import canonical_grid

EQUAL_VARIANCE = 0.5  # σ² of every class with variances="equal": the Gaussian's exponent is (I − c)²
VAR_FLOOR = 1e-4  # normalised units (the image's 5–95 % spread is 1)
_TV_EPS = 1e-6  # smooths |∇P| at 0 (mm⁻²)


@dataclass
class AcwePrediction:
    """``log_posterior [B, K, *S]``: log P_kx on the canonical network grid."""

    log_posterior: torch.Tensor

    @property
    def posterior(self) -> torch.Tensor:
        return self.log_posterior.exp()


class AcweNet(nn.Module):
    """Images + coverage (+ the placed atlas) → soft segmentation: a MONAI U-Net with K softmax outputs.

    Parameters
    ----------
    n_images, n_classes : int
    settings : AcweNetSettings
        Resolved (:meth:`~mvmm.core.settings.NetworkSettings.resolved`): the grid is fixed.
    atlas_role : {"none", "prior", "region"}
        ``"prior"``: the placed atlas's K maps are inputs and its log-prior a term of the energy (the
        classes are the atlas's); ``"region"``: the atlas only bounds the region (the region's mask
        is an input; the classes are unnamed phases). Either way the energy counts within
        the atlas's region and the segmentation is the background beyond it.
    """

    augment_channels = None  # training moves every image (and a labelled case's labels with them)

    def __init__(self, n_images: int, n_classes: int, settings: AcweNetSettings, atlas_role: str = "none"):
        super().__init__()
        from monai.networks.nets import UNet  # imported when a network is built: `mvmm --help` stays fast

        self.settings, self.n_classes, self.atlas_role = settings, n_classes, atlas_role
        self.grid: Grid = canonical_grid(settings)
        in_channels = 2 * n_images + {"none": 0, "prior": n_classes, "region": 1}[atlas_role]
        self.backbone = UNet(spatial_dims=self.grid.ndim, in_channels=in_channels, out_channels=n_classes,
                             channels=tuple(settings.channels), strides=(2,) * (len(settings.channels) - 1),
                             num_res_units=1)

    def forward(self, batch: Dict[str, torch.Tensor]) -> AcwePrediction:
        """``batch`` of :func:`mvmm.nets.data.stack_cases`: images, coverage (and prior) ``[B, ·, *S]``."""
        parts = [batch["images"], batch["coverage"].to(batch["images"].dtype)]
        if self.atlas_role == "prior":
            parts.append(batch["prior"])
        elif self.atlas_role == "region":  # the atlas's region of interest, as a mask
            parts.append(batch["region"].unsqueeze(1).to(batch["images"].dtype))
        return AcwePrediction(torch.log_softmax(self.backbone(torch.cat(parts, dim=1)), dim=1))

    def loss(self, batch: Dict[str, torch.Tensor], prediction: AcwePrediction,
             smoothness: float = 0.0) -> Dict[str, torch.Tensor]:
        """:func:`acwe_loss` with this network's settings (``smoothness``, the velocity weight of the
        networks that warp, does not apply: the length weight is ``settings.length_weight``)."""
        return acwe_loss(batch, prediction, self.settings, self.grid.spacing, self.atlas_role == "prior")


def region_params(images: torch.Tensor, coverage: torch.Tensor, posterior: torch.Tensor, region: torch.Tensor,
                  variances: str = "equal") -> MixtureParams:
    """θ(P): the mixture's closed-form M-step under the soft segmentation, one Gaussian per class.

    Parameters
    ----------
    images, coverage : torch.Tensor, shape [B, N, *S]
    posterior : torch.Tensor, shape [B, K, *S]
    region : torch.Tensor, bool, shape [B, *S]
        The voxels that count.
    variances : {"equal", "fitted"}
        σ² = ½ for every class (Chan–Vese), or each class's soft variance.

    Returns
    -------
    MixtureParams
        Means ``[B, N, K, 1]`` are the region constants c_ik (differentiable in P), float64.
    """
    b, n, k = images.shape[0], images.shape[1], posterior.shape[1]
    counted = posterior * region.unsqueeze(1).to(posterior.dtype)
    within = [torch.ones_like(counted).unsqueeze(2)] * n  # one subtype: P(c | k, x) = 1
    start = MixtureParams.empty(np.ones((n, k), dtype=np.int64), b, images.device)
    floor = torch.full((b, n), VAR_FLOOR, dtype=torch.float64, device=images.device)
    params = m_step(images, coverage, counted, within, start, floor, learn_proportions=False).params
    if variances == "equal":
        params.variances = torch.full_like(params.variances, EQUAL_VARIANCE)
    return params


def region_energy(images: torch.Tensor, coverage: torch.Tensor, params: MixtureParams,
                  log_atlas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-voxel cost of each class, ``[B, K, *S]``: ``−log p(I(x) | k; θ) − c(x) − log π_kx`` with
    ``c(x) = Σ_i M_i(x) ½ log(2π σ²_eq)`` (so that, for σ² = ½, the cost is ``Σ_i M_i (I_i − c_ik)²``)
    and π_kx the atlas prior (none without ``log_atlas``). The functional core's densities."""
    log_lik, _ = tissue_log_likelihood(images, coverage, params)
    constant = 0.5 * math.log(2 * math.pi * EQUAL_VARIANCE) * coverage.to(log_lik.dtype).sum(1, keepdim=True)
    cost = -log_lik - constant
    if log_atlas is not None:
        cost = cost - log_prior(log_atlas, params.log_proportions, images.dim() - 2).to(cost.dtype)
    return cost


def boundary_length(posterior: torch.Tensor, spacing) -> torch.Tensor:
    """``½ Σ_k |∇P_k|`` per voxel (mm⁻¹), ``[B, *S]``: the total variation of the soft segmentation,
    forward differences in mm (``spacing`` in ITK order), the last row along each axis 0. For a hard
    two-class P it is the boundary's length (area in 3D) per voxel."""
    ndim = posterior.dim() - 2
    squared = torch.zeros_like(posterior)
    for axis in range(ndim):
        dim = 2 + axis
        h = float(spacing[ndim - 1 - axis])  # array axis → ITK axis
        diff = torch.diff(posterior, dim=dim) / h
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis) + 1] = 1  # F.pad lists the last axis first
        squared = squared + F.pad(diff, pad) ** 2
    return 0.5 * (squared + _TV_EPS).sqrt().sum(1)


def acwe_loss(batch: Dict[str, torch.Tensor], prediction: AcwePrediction, settings: AcweNetSettings,
              spacing, with_atlas: bool) -> Dict[str, torch.Tensor]:
    """The Chan–Vese energy of the module notes, averaged over the batch.

    Returns ``loss``, ``data`` (the region term, with the atlas's prior term), ``length`` (mean
    ``½ Σ_k |∇P_k|``, mm⁻¹) and ``labels`` (cross-entropy over labelled voxels; 0 without any).
    """
    images, coverage, region = batch["images"], batch["coverage"], batch["region"]
    posterior = prediction.posterior
    params = region_params(images, coverage, posterior, region, settings.variances)
    log_atlas = log_of_prior(batch["prior"]) if with_atlas else None
    cost = region_energy(images, coverage, params, log_atlas)
    data = masked_mean((posterior * cost.to(posterior.dtype)).sum(1), region).mean()
    length = masked_mean(boundary_length(posterior, spacing), region).mean()
    loss = data + settings.length_weight * length
    labelled = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if "labels" in batch:
        labelled = labelled_cross_entropy(prediction.log_posterior, batch["labels"])
        loss = loss + settings.label_weight * labelled
    return {"loss": loss, "data": data, "length": length, "labels": labelled}
