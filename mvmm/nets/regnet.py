"""A VoxelMorph-style registration network (Balakrishnan et al. 2019; diffeomorphic as Dalca et al.
2018/2019): fixed + moving image → stationary velocity field, trained unsupervised on image similarity.

The pair lies on the fixed image's network grid (:func:`mvmm.nets.data.prepare_pair`, headers
only); the network reads ``[fixed, moving, fixed coverage, moving coverage]`` and predicts v
(:class:`~mvmm.nets.velocity.VelocityNet`); the moving image is pulled back through ``exp(v)``
and compared with the fixed one by mvmm's own similarity losses (:mod:`mvmm.spatial.similarity`:
local NCC or mutual information) over the overlap, plus ``λ · mean ‖∇v‖²``. The transform it
predicts maps the fixed image's world into the moving image's, as ``mvmm register``'s do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from mvmm.core.settings import RegNetSettings
from mvmm.nets.velocity import VelocityNet
from mvmm.spatial.nonlinear import StationaryVelocityField
from mvmm.spatial.regularizers import diffusion_energy
from mvmm.spatial.similarity import similarity_loss


@dataclass
class RegPrediction:
    """``velocity [B, ndim, *control]``, ``svf`` (batched, canonical grid), the moving image and its
    coverage pulled back: ``moved [B, 1, *S]``, ``moved_coverage [B, 1, *S]`` (float, 0..1)."""

    velocity: torch.Tensor
    svf: StationaryVelocityField
    moved: torch.Tensor
    moved_coverage: torch.Tensor


class RegNet(VelocityNet):
    """Fixed + moving → SVF; see the module notes."""

    augment_channels = (1,)  # training moves the moving image only

    def __init__(self, settings: RegNetSettings):
        super().__init__(4, settings)
        self._similarity = similarity_loss(settings.metric)

    def forward(self, batch: Dict[str, torch.Tensor]) -> RegPrediction:
        images, coverage = batch["images"], batch["coverage"]
        _, velocity = self.features_and_velocity(torch.cat([images, coverage.to(images.dtype)], dim=1))
        svf = self.svf(velocity)
        moved = self.pull_back(torch.cat([images[:, 1:], coverage[:, 1:].to(images.dtype)], dim=1), svf, "zeros")
        return RegPrediction(velocity, svf, moved[:, :1], moved[:, 1:])

    def loss(self, batch: Dict[str, torch.Tensor], prediction: RegPrediction, smoothness: float) -> Dict[str, torch.Tensor]:
        """Mean over the batch of the similarity loss on the overlap, plus ``λ · mean ‖∇v‖²``."""
        fixed, covered = batch["images"][:, :1], batch["coverage"][:, 0]
        overlap = covered & (prediction.moved_coverage[:, 0] > 0.5)
        terms = [self._similarity(fixed[b], prediction.moved[b], overlap[b]) for b in range(fixed.shape[0])]
        dissimilarity = torch.stack(terms).mean()
        smooth = diffusion_energy(prediction.svf.velocity_field(), prediction.svf.field_grid)
        return {"loss": dissimilarity + smoothness * smooth, "data": dissimilarity, "smoothness": smooth}
