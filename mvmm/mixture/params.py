"""The appearance parameters θ of the multivariate mixture: one container for EM and networks.

Every tensor has a leading batch dimension B (subjects): the EM estimator holds B = 1, a network
head predicts one set per subject of a batch. Unequal subtype counts are padded to ``Cmax``; the
padding has log-weight −inf, so it never contributes to a density.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F


def subtype_mask(n_subtypes: np.ndarray, device=None) -> torch.Tensor:
    """Bool ``[N, K, Cmax]``: which entries of a padded parameter tensor are real subtypes."""
    counts = torch.as_tensor(np.asarray(n_subtypes, dtype=np.int64), device=device)
    c = torch.arange(int(counts.max()), device=device)
    return c < counts.unsqueeze(-1)


@dataclass
class MixtureParams:
    """Subtype Gaussians per subject, image and tissue, plus the global tissue proportions.

    Attributes
    ----------
    means, variances : torch.Tensor, shape [B, N, K, Cmax]
        μ_ikc and σ²_ikc of each subject b; entries past ``n_subtypes[i, k]`` are padding.
    log_weights : torch.Tensor, shape [B, N, K, Cmax]
        log τ_ikc (Σ_c τ_ikc = 1); −inf on padding.
    log_proportions : torch.Tensor, shape [B, K]
        log π_k (Σ_k π_k = 1).
    n_subtypes : np.ndarray of int, shape [N, K]
        Subtype counts (the same for every subject of the batch).

    EM keeps these in float64; a network head produces them in its own dtype. The functional core
    (:mod:`mvmm.mixture.functional`) evaluates densities in the images' dtype either way.
    """

    means: torch.Tensor
    variances: torch.Tensor
    log_weights: torch.Tensor
    log_proportions: torch.Tensor
    n_subtypes: np.ndarray

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, n_subtypes, batch_size: int = 1, device=None, dtype=torch.float64) -> "MixtureParams":
        """Means 0, variances 1, uniform weights and proportions, for ``batch_size`` subjects."""
        n_subtypes = np.asarray(n_subtypes, dtype=np.int64)
        shape = (batch_size,) + n_subtypes.shape + (int(n_subtypes.max()),)
        mask = subtype_mask(n_subtypes, device)
        counts = torch.as_tensor(n_subtypes, dtype=dtype, device=device).unsqueeze(-1)
        log_weights = torch.where(mask, -torch.log(counts).expand(mask.shape),
                                  torch.full(mask.shape, -torch.inf, dtype=dtype, device=device))
        n_classes = n_subtypes.shape[1]
        log_proportions = torch.full((batch_size, n_classes), -float(np.log(n_classes)), dtype=dtype, device=device)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.ones(shape, dtype=dtype, device=device),
                   log_weights.expand(shape).clone(), log_proportions, n_subtypes)

    @classmethod
    def from_head(cls, means: torch.Tensor, variance_logits: torch.Tensor, weight_logits: torch.Tensor,
                  proportion_logits: Optional[torch.Tensor], n_subtypes,
                  var_floor: Union[float, torch.Tensor] = 1e-3) -> "MixtureParams":
        """Valid parameters from a network head's unconstrained outputs (differentiable).

        Parameters
        ----------
        means : torch.Tensor, shape [B, N, K, Cmax]
            Subtype means, taken as they are (in the units of the images the head saw).
        variance_logits : torch.Tensor, shape [B, N, K, Cmax]
            ``σ² = var_floor + softplus(variance_logits)``: positive, never below the floor.
        weight_logits : torch.Tensor, shape [B, N, K, Cmax]
            ``log τ = log_softmax`` over the real subtypes of each tissue (padding ignored).
        proportion_logits : torch.Tensor, shape [B, K], or None
            ``log π = log_softmax``; None gives equal proportions (the prior is the atlas itself).
        n_subtypes : array-like of int, shape [N, K]
        var_floor : float or torch.Tensor broadcastable to [B, N, K, Cmax]
            E.g. a fraction of each image's variance, ``[1, N, 1, 1]``.
        """
        n_subtypes = np.asarray(n_subtypes, dtype=np.int64)
        mask = subtype_mask(n_subtypes, means.device)
        variances = var_floor + F.softplus(variance_logits)
        log_weights = torch.log_softmax(weight_logits.masked_fill(~mask, -torch.inf), dim=-1)
        log_weights = log_weights.masked_fill(~mask, -torch.inf)  # a single-subtype tissue: exactly 0, padding −inf
        if proportion_logits is None:
            k = n_subtypes.shape[1]
            log_proportions = means.new_full((means.shape[0], k), -float(np.log(k)))
        else:
            log_proportions = torch.log_softmax(proportion_logits, dim=-1)
        return cls(means, variances, log_weights, log_proportions, n_subtypes)

    @classmethod
    def stack(cls, items: Sequence["MixtureParams"]) -> "MixtureParams":
        """Concatenate the batches of several parameter sets (same subtype counts)."""
        first = items[0]
        if any(not np.array_equal(p.n_subtypes, first.n_subtypes) for p in items):
            raise ValueError("items: every parameter set must have the same n_subtypes")
        return cls(*(torch.cat([getattr(p, name) for p in items]) for name in
                     ("means", "variances", "log_weights", "log_proportions")), first.n_subtypes.copy())

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def subtype_mask(self) -> torch.Tensor:
        """Bool ``[N, K, Cmax]``: which entries are real subtypes."""
        return subtype_mask(self.n_subtypes, self.means.device)

    @property
    def weights(self) -> torch.Tensor:
        """τ, ``[B, N, K, Cmax]`` (0 on padding)."""
        return self.log_weights.exp()

    @property
    def proportions(self) -> torch.Tensor:
        """π, ``[B, K]``."""
        return self.log_proportions.exp()

    def subject(self, b: int) -> "MixtureParams":
        """Subject ``b`` alone, as a batch of one."""
        return MixtureParams(self.means[b:b + 1], self.variances[b:b + 1], self.log_weights[b:b + 1],
                             self.log_proportions[b:b + 1], self.n_subtypes)

    def _map(self, fn) -> "MixtureParams":
        return MixtureParams(fn(self.means), fn(self.variances), fn(self.log_weights), fn(self.log_proportions),
                             self.n_subtypes.copy())

    def to(self, device=None, dtype=None) -> "MixtureParams":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def clone(self) -> "MixtureParams":
        return self._map(torch.clone)

    def detach(self) -> "MixtureParams":
        return self._map(torch.Tensor.detach)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Nested lists without padding (one subject): ``means[i][k]`` lists that tissue's subtype means."""
        if self.batch_size != 1:
            raise ValueError(f"to_dict: holds {self.batch_size} subjects; save one at a time (subject(b))")
        weights = self.weights

        def unpad(t):
            t = t[0].detach().double().cpu()
            return [[t[i, k, : self.n_subtypes[i, k]].tolist() for k in range(t.shape[1])] for i in range(t.shape[0])]
        return {"means": unpad(self.means), "variances": unpad(self.variances), "weights": unpad(weights),
                "proportions": self.proportions[0].detach().double().cpu().tolist()}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "MixtureParams":
        n_subtypes = np.array([[len(c) for c in row] for row in d["means"]], dtype=np.int64)
        params = cls.empty(n_subtypes)
        weights = torch.zeros_like(params.means)
        for name, target in (("means", params.means), ("variances", params.variances), ("weights", weights)):
            for i, row in enumerate(d[name]):
                for k, values in enumerate(row):
                    target[0, i, k, : len(values)] = torch.as_tensor(values, dtype=torch.float64)
        params.log_weights = torch.where(params.subtype_mask, weights.log(), params.log_weights)
        params.log_proportions = torch.log(torch.as_tensor(d["proportions"], dtype=torch.float64)).unsqueeze(0)
        return params.to(device)
