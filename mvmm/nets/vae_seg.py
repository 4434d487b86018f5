"""Segmentation on a learned anatomical prior (Dalca, Guttag & Sabuncu, CVPR 2018), on mvmm's likelihood.

An image encoder (MONAI ``Regressor``) reads a case on its network grid (images and coverage,
``[B, 2N, *S]``) and predicts q(z | I) = N(m, diag e^ℓ) over the latent code of a trained
:class:`~mvmm.nets.prior.PriorVAE`; the prior's decoder — frozen, trained on label maps alone —
turns z into the spatial prior ``π_kx(z)`` in place of a warped atlas. The appearance θ is not a
learned head but the model's own closed-form EM under that prior: the prior-weighted moments
(:func:`mvmm.mixture.init.params_from_tissue_weights`, as EM starts), then ``em_steps`` E- and
M-steps of the functional core, differentiable. The loss is the negative ELBO per voxel of the
fixed region Ω (within ``roi_margin_mm`` of the prior's mean shape)::

    L = mean_b [ NLL_b(θ, π(z)) / |Ω_b| + w · KL(q(z | I_b) ‖ N(0, I)) / |Ω_b| ],   z ~ q(z | I_b)

with NLL the functional core's :func:`~mvmm.mixture.functional.negative_log_likelihood` — EM's
objective. Samples of z give samples of the prior and of the posterior (uncertainty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from mvmm.core.settings import VaeSegSettings
from mvmm.data.roi import atlas_roi
from mvmm.mixture.functional import log_joint, log_posteriors, m_step, negative_log_likelihood, tissue_log_likelihood
from mvmm.mixture.init import params_from_tissue_weights
from mvmm.mixture.params import MixtureParams
from mvmm.nets.data import canonical_grid
from mvmm.nets.prior import LOG_VAR_RANGE, PriorVAE, kl_to_standard_normal, sample_latent

VAR_FLOOR = 1e-4  # normalised units (the image's 5–95 % spread is 1)


@dataclass
class VaePrediction:
    """For a batch of B cases: q(z | I) (``mean``, ``log_var`` ``[B, latent]``), the decoded
    ``log_prior [B, K, *S]`` of the z used, and θ under it (normalised intensity units)."""

    mean: torch.Tensor
    log_var: torch.Tensor
    log_prior: torch.Tensor
    params: MixtureParams


def em_appearance(images: torch.Tensor, coverage: torch.Tensor, log_prior: torch.Tensor, region: torch.Tensor,
                  n_subtypes: np.ndarray, steps: int) -> MixtureParams:
    """θ of each case by EM under a fixed prior: the prior-weighted moments, then ``steps`` E/M-steps.

    Parameters
    ----------
    images, coverage : torch.Tensor, shape [B, N, *S]
    log_prior : torch.Tensor, shape [B, K, *S]
        log π_kx (normalised over K).
    region : torch.Tensor, bool, shape [B, *S]
    n_subtypes : np.ndarray of int, shape [N, K]
    steps : int

    Returns
    -------
    MixtureParams
        Float64, batch B; differentiable in ``log_prior`` (and the images).
    """
    b, n = images.shape[:2]
    starts = []
    for j in range(b):
        x = images[j].flatten(1)
        m = (coverage[j] & region[j]).flatten(1)
        starts.append(params_from_tissue_weights(x, m, log_prior[j].exp().flatten(1), n_subtypes,
                                                 torch.full((n,), VAR_FLOOR, dtype=torch.float64, device=x.device)))
    params = MixtureParams.stack(starts)
    floor = torch.full((b, n), VAR_FLOOR, dtype=torch.float64, device=images.device)
    counted = region.unsqueeze(1).to(images.dtype)
    for _ in range(steps):
        posterior = log_posteriors(log_joint(images, coverage, params, log_prior)).exp() * counted
        _, within = tissue_log_likelihood(images, coverage, params, keep_within=True)
        params = m_step(images, coverage, posterior, within, params, floor, learn_proportions=False).params
    return params


class VaeSegNet(nn.Module):
    """Images → q(z | I) → prior π(z) (frozen decoder) → θ by EM; see the module notes.

    Parameters
    ----------
    n_subtypes : array-like of int, shape [N, K]
    settings : VaeSegSettings
        Resolved, on the prior's grid.
    prior : PriorVAE
        The trained prior; its weights are frozen (and saved with this network's).
    background_index : int
        The prior's background class (for the region of interest).
    """

    augment_channels = None

    def __init__(self, n_subtypes, settings: VaeSegSettings, prior: PriorVAE, background_index: int = 0):
        super().__init__()
        from monai.networks.nets import Regressor  # imported when a network is built

        self.n_subtypes = np.asarray(n_subtypes, dtype=np.int64)
        self.settings, self.background_index = settings, background_index
        self.grid = canonical_grid(settings)
        n = self.n_subtypes.shape[0]
        shape = tuple(reversed(self.grid.size))
        self.encoder = Regressor(in_shape=(2 * n,) + shape, out_shape=(2, prior.settings.latent),
                                 channels=tuple(settings.channels), strides=(2,) * len(settings.channels),
                                 num_res_units=1)
        self.prior = prior
        self.prior.requires_grad_(False)
        self._region: Optional[torch.Tensor] = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.prior.eval()  # frozen: its normalisation layers stay in inference mode
        return self

    def mean_shape_region(self) -> torch.Tensor:
        """``[*S]`` bool: within ``roi_margin_mm`` of the foreground of the prior's mean shape (z = 0)."""
        if self._region is None or self._region.device != self.prior.location.device:
            with torch.no_grad():
                mean_prior = self.prior.decode(torch.zeros((1, self.prior.settings.latent),
                                                           device=self.prior.location.device))[0].exp()
            self._region = atlas_roi(mean_prior, self.background_index, tuple(reversed(self.grid.spacing)),
                                     self.settings.roi_margin_mm)
        return self._region

    def encode(self, batch: Dict[str, torch.Tensor]):
        """``mean``, ``log_var`` ``[B, latent]`` of q(z | I)."""
        images, coverage = batch["images"], batch["coverage"]
        out = self.encoder(torch.cat([images, coverage.to(images.dtype)], dim=1))
        return out[:, 0], out[:, 1].clamp(*LOG_VAR_RANGE)

    def region(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mean_shape_region().unsqueeze(0) & batch["coverage"].any(1)

    def predict(self, batch: Dict[str, torch.Tensor], z: torch.Tensor, mean=None, log_var=None) -> VaePrediction:
        """Prior and θ for given latent codes ``z [B, latent]``."""
        log_prior = self.prior.decode(z)
        params = em_appearance(batch["images"], batch["coverage"], log_prior, self.region(batch), self.n_subtypes,
                               self.settings.em_steps)
        return VaePrediction(mean, log_var, log_prior, params)

    def forward(self, batch: Dict[str, torch.Tensor]) -> VaePrediction:
        mean, log_var = self.encode(batch)
        z = sample_latent(mean, log_var) if self.training else mean
        return self.predict(batch, z, mean, log_var)

    def loss(self, batch: Dict[str, torch.Tensor], prediction: VaePrediction,
             smoothness: float = 0.0) -> Dict[str, torch.Tensor]:
        """The negative ELBO per voxel of the region (module notes): ``loss``, ``data`` (the NLL per
        voxel) and ``kl`` (per voxel). ``smoothness`` does not apply."""
        region = self.region(batch)
        nll = negative_log_likelihood(batch["images"], batch["coverage"], prediction.params, prediction.log_prior,
                                      mask=region)
        kl = kl_to_standard_normal(prediction.mean, prediction.log_var) / region.flatten(1).sum(1).clamp_min(1)
        return {"loss": (nll + self.settings.kl_weight * kl).mean(), "data": nll.mean(), "kl": kl.mean()}
