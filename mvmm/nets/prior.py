"""The anatomical prior of Dalca, Guttag & Sabuncu (CVPR 2018): a VAE trained on label maps alone.

Label maps of any data set and sequence (ACDC cine, MS-CMRSeg LGE, …) are put on a *prior grid*
(the network grid's size, spacing and heart frame, centred on the labels' foreground centroid:
:func:`mvmm.nets.data.prepare_label_case`) as class indices. A MONAI ``VarAutoEncoder`` encodes the
one-hot map into a latent code z (``latent`` dimensions, q(z | s) Gaussian) and decodes z into
per-class logits, to which a learned *location prior* (one logit map per class, a parameter) is
added: ``log π(z) = log_softmax(decoder(z) + location)``. It is trained by the negative ELBO per voxel,

    L = (1/V) [ −Σ_x log π_{s(x), x}(z) + KL(q(z | s) ‖ N(0, I)) ],   z ~ q(z | s),

with the labels moved by the same random motion as the images of the other networks (the latent
space learns the heart's pose as well as its shape). The decoder is then the spatial prior of
:mod:`mvmm.nets.vae_seg`: ``π_kx = softmax(decoder(z) + location)``, the model's atlas replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from mvmm.core.grid import Grid
from mvmm.core.settings import PriorVaeSettings
from mvmm.nets.data import canonical_grid

# bounds of the encoders' log-variance: exp stays finite (an unbounded one overflowed the KL term
# after 79 epochs on ACDC), and no code is more certain than e^-6 sd
LOG_VAR_RANGE = (-12.0, 6.0)


@dataclass
class PriorPrediction:
    """``log_prior [B, K, *S]`` (log π_kx of the decoded z), ``mean``/``log_var`` ``[B, latent]`` of q(z | s)."""

    log_prior: torch.Tensor
    mean: torch.Tensor
    log_var: torch.Tensor


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(log_var)) ‖ N(0, I))`` per case, ``[B, D] → [B]``."""
    return 0.5 * (mean ** 2 + log_var.exp() - 1.0 - log_var).sum(-1)


def sample_latent(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``z = mean + exp(log_var / 2) ε``, ε ~ N(0, I) from torch's generator (the reparameterisation trick)."""
    return mean + (0.5 * log_var).exp() * torch.randn_like(mean)


class PriorVAE(nn.Module):
    """Label map (one-hot) → q(z | s) → log π(z); see the module notes.

    Parameters
    ----------
    n_classes : int
    settings : PriorVaeSettings
        Resolved: the grid is fixed. ``channels`` are the VAE's levels (each a stride-2 convolution).
    """

    augment_channels = None

    def __init__(self, n_classes: int, settings: PriorVaeSettings):
        super().__init__()
        from monai.networks.nets import VarAutoEncoder  # imported when a network is built

        self.settings, self.n_classes = settings, n_classes
        self.grid: Grid = canonical_grid(settings)
        shape = tuple(reversed(self.grid.size))  # array order [*S]
        self.vae = VarAutoEncoder(spatial_dims=self.grid.ndim, in_shape=(n_classes,) + shape, out_channels=n_classes,
                                  latent_size=settings.latent, channels=tuple(settings.channels),
                                  strides=(2,) * len(settings.channels), num_res_units=1, use_sigmoid=False)
        self.location = nn.Parameter(torch.zeros((n_classes,) + shape))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, latent]`` → ``log π [B, K, *S]`` on the canonical grid."""
        return torch.log_softmax(self.vae.decode_forward(z, use_sigmoid=False) + self.location, dim=1)

    def encode(self, labels: torch.Tensor):
        """Class indices ``[B, *S]`` (−1: unknown, taken as background 0) → mean, log-variance ``[B, latent]``."""
        onehot = F.one_hot(labels.clamp_min(0), self.n_classes).movedim(-1, 1).to(self.location.dtype)
        mean, log_var = self.vae.encode_forward(onehot)
        return mean, log_var.clamp(*LOG_VAR_RANGE)

    def forward(self, batch: Dict[str, torch.Tensor]) -> PriorPrediction:
        mean, log_var = self.encode(batch["labels"])
        z = sample_latent(mean, log_var) if self.training else mean
        return PriorPrediction(self.decode(z), mean, log_var)

    def loss(self, batch: Dict[str, torch.Tensor], prediction: PriorPrediction,
             smoothness: float = 0.0) -> Dict[str, torch.Tensor]:
        """The negative ELBO per voxel (module notes): ``loss``, ``data`` (cross-entropy per voxel) and
        ``kl`` (per voxel). ``smoothness`` does not apply."""
        labels = batch["labels"]
        known = labels >= 0
        picked = prediction.log_prior.gather(1, labels.clamp_min(0).unsqueeze(1))[:, 0]
        voxels = known.flatten(1).sum(1).clamp_min(1)
        data = -(torch.where(known, picked, torch.zeros_like(picked)).flatten(1).sum(1) / voxels)
        kl = kl_to_standard_normal(prediction.mean, prediction.log_var) / voxels
        return {"loss": (data + kl).mean(), "data": data.mean(), "kl": kl.mean()}
