"""The Bayesian segmentation CNN of Dalca et al. (MICCAI 2019), on mvmm's multivariate likelihood.

A MONAI U-Net reads a case on its network grid (images, coverage masks, the placed atlas prior:
``[B, 2N + K, *S]``) and two heads read its features:

- **velocity**: a convolution gives a dense field in mm along the grid's axes, sampled at the control
  points of a cubic B-spline stationary velocity field — mvmm's own
  :class:`~mvmm.spatial.nonlinear.StationaryVelocityField`, filled through its parameter slot. The
  atlas is pulled back through ``exp(v)`` (scaling and squaring).
- **appearance**: per tissue k, the warped prior weights the features and each image's intensities;
  a small MLP turns the pooled features and those moments (``m_ik``, ``s_ik``) into each subtype's
  mean ``m_ik + s_ik δ``, variance logit ``ρ + 2 log s_ik`` and weight logit, and the tissue
  proportions, made valid by :meth:`MixtureParams.from_head` — the θ of every image, tissue and
  subtype, in normalised intensity units.

:func:`bayes_loss` is the functional core's negative log-likelihood of the case under that θ and
warped prior, plus ``λ · mean ‖∇v‖²``: the objective EM maximises, not a copy of it. Training
cases with label maps (semi-supervised, ``mvmm train bayes --labelled-patients``) add the
cross-entropy of the model's own posterior — ``P(k | I(x)) ∝ A_k(φ_v(x)) N(I(x); θ_k)``, the
segmentation the network returns — at their labelled voxels, weighted by ``label_weight``: what
VoxelMorph's auxiliary segmentation loss is to its registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from torch import nn

from mvmm.core.settings import BayesNetSettings
from mvmm.mixture.functional import (labelled_cross_entropy, log_joint, log_posteriors, negative_log_likelihood,
                                     tissue_log_likelihood)
from mvmm.mixture.model import log_of_prior
from mvmm.mixture.params import MixtureParams
from mvmm.nets.velocity import VelocityNet
from mvmm.spatial.nonlinear import StationaryVelocityField
from mvmm.spatial.regularizers import diffusion_energy

VAR_FLOOR = 1e-4  # variance floor in normalised units (the image's 5–95 % spread is 1)
_EPS = 1e-6


@dataclass
class BayesPrediction:
    """What the network predicts for a batch of B cases on the canonical network grid.

    Attributes
    ----------
    velocity : torch.Tensor, shape [B, ndim, *control]
        B-spline coefficients of v (mm, canonical axes).
    svf : StationaryVelocityField
        ``exp(v)`` on the canonical grid (batched).
    warped_prior : torch.Tensor, shape [B, K, *S]
        The placed prior pulled back through ``exp(v)``.
    params : MixtureParams
        θ of each case, normalised intensity units.
    """

    velocity: torch.Tensor
    svf: StationaryVelocityField
    warped_prior: torch.Tensor
    params: MixtureParams


class BayesSegNet(VelocityNet):
    """Scan + atlas → (stationary velocity field, mixture parameters); see the module notes.

    The backbone and velocity head are :class:`~mvmm.nets.velocity.VelocityNet`'s.

    Parameters
    ----------
    n_subtypes : array-like of int, shape [N, K]
        Subtype counts of each image and tissue (fixes N, K and the head's outputs).
    settings : BayesNetSettings
        Resolved (:meth:`BayesNetSettings.resolved`): the grid is fixed.
    """

    def __init__(self, n_subtypes, settings: BayesNetSettings):
        self.n_subtypes = np.asarray(n_subtypes, dtype=np.int64)
        n, k = self.n_subtypes.shape
        super().__init__(2 * n + k, settings)
        self.c_max = int(self.n_subtypes.max())
        width = settings.features + 2 * n
        self.appearance_head = nn.Sequential(nn.Linear(width, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64),
                                             nn.LeakyReLU(0.2), nn.Linear(64, n * self.c_max * 3 + 1))

    def forward(self, batch: Dict[str, torch.Tensor]) -> BayesPrediction:
        """Predict for a batch (:func:`mvmm.nets.data.stack_cases`: images, coverage, prior)."""
        images, coverage, prior = batch["images"], batch["coverage"], batch["prior"]
        features, velocity = self.features_and_velocity(torch.cat([images, coverage.to(images.dtype), prior], dim=1))
        svf = self.svf(velocity)
        warped = self.pull_back(prior, svf)
        params = self._appearance(features, images, coverage, warped)
        return BayesPrediction(velocity, svf, warped, params)

    augment_channels = None  # training moves every image (against the atlas)

    def loss(self, batch: Dict[str, torch.Tensor], prediction: BayesPrediction,
             smoothness: float) -> Dict[str, torch.Tensor]:
        """:func:`bayes_loss`."""
        return bayes_loss(self, batch, prediction, smoothness)

    def _appearance(self, features, images, coverage, warped) -> MixtureParams:
        b, n, k = images.shape[0], images.shape[1], warped.shape[1]
        weights = warped.flatten(2)  # [B, K, V]
        covered = coverage.flatten(2).to(images.dtype)  # [B, N, V]
        x = images.flatten(2)
        pooled = torch.einsum("bkv,bfv->bkf", weights, features.flatten(2)) / (weights.sum(-1, keepdim=True) + _EPS)
        w = weights.unsqueeze(2) * covered.unsqueeze(1)  # [B, K, N, V]
        mass = w.sum(-1) + _EPS
        mean = (w * x.unsqueeze(1)).sum(-1) / mass  # [B, K, N]
        spread = ((w * (x.unsqueeze(1) - mean.unsqueeze(-1)) ** 2).sum(-1) / mass + VAR_FLOOR).sqrt()
        head = self.appearance_head(torch.cat([pooled, mean, spread.log()], dim=-1))  # [B, K, N·C·3 + 1]
        shaped = head[..., :-1].reshape(b, k, n, self.c_max, 3).permute(0, 2, 1, 3, 4)  # [B, N, K, C, 3]
        m, s = mean.transpose(1, 2).unsqueeze(-1), spread.transpose(1, 2).unsqueeze(-1)  # [B, N, K, 1]
        means = m + s * shaped[..., 0]
        # softplus(ρ + 2 log s) ≈ s² e^ρ for the small variances of normalised images: ρ is relative
        variance_logits = shaped[..., 1] + 2 * s.log()
        # held proportions (π equal, the prior is the warped atlas itself), as the classical path's
        # --proportions atlas: learned ones let the likelihood shrink the background's share
        proportions = head[..., -1] if self.settings.proportions == "learned" else None
        return MixtureParams.from_head(means, variance_logits, shaped[..., 2], proportions, self.n_subtypes,
                                       var_floor=VAR_FLOOR)


def bayes_loss(net: BayesSegNet, batch: Dict[str, torch.Tensor], prediction: BayesPrediction,
               smoothness: float) -> Dict[str, torch.Tensor]:
    """``mean_b [NLL_b / voxel] + λ · mean ‖∇v‖² (+ label_weight · CE)``; returns ``loss``, ``data``
    (the NLL), ``smoothness`` and, when the batch carries ``labels``, ``labels`` (the cross-entropy).

    The NLL is :func:`mvmm.mixture.functional.negative_log_likelihood` (EM's objective) of the
    normalised images under the predicted θ and warped prior, over each case's region. The
    cross-entropy is ``−mean log P(label(x) | I(x))`` of the same model's posterior over the voxels
    whose label is known (``labels [B, *S]`` ≥ 0; 0 when the batch has none).
    """
    log_atlas = log_of_prior(prediction.warped_prior)
    # the images' log p(I | k), once for the NLL and the label term's posterior
    log_lik, _ = tissue_log_likelihood(batch["images"], batch["coverage"], prediction.params)
    nll = negative_log_likelihood(None, batch["coverage"], prediction.params, log_atlas, mask=batch["region"],
                                  log_lik=log_lik).mean()
    velocity = prediction.svf.velocity_field()
    smooth = diffusion_energy(velocity, prediction.svf.field_grid)
    terms = {"loss": nll + smoothness * smooth, "data": nll, "smoothness": smooth}
    if "labels" in batch:
        joint = log_joint(None, batch["coverage"], prediction.params, log_atlas, log_lik=log_lik)
        labelled = labelled_cross_entropy(log_posteriors(joint), batch["labels"])
        terms["loss"] = terms["loss"] + net.settings.label_weight * labelled
        terms["labels"] = labelled
    return terms
