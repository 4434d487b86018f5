"""The appearance parameters θ of the multivariate mixture, padded to a common subtype count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixtureParams:
    """Subtype Gaussians per image and tissue, plus the global tissue proportions.

    Attributes
    ----------
    means, variances, weights : torch.Tensor, float64, shape [N, K, Cmax]
        μ_ikc, σ²_ikc and τ_ikc; entries past ``n_subtypes[i, k]`` are padding (weight 0).
    proportions : torch.Tensor, float64, shape [K]
        π_k, summing to one.
    n_subtypes : np.ndarray of int, shape [N, K]
    """

    means: torch.Tensor
    variances: torch.Tensor
    weights: torch.Tensor
    proportions: torch.Tensor
    n_subtypes: np.ndarray

    @classmethod
    def empty(cls, n_subtypes: np.ndarray, device=None) -> "MixtureParams":
        n_subtypes = np.asarray(n_subtypes, dtype=np.int64)
        shape = n_subtypes.shape + (int(n_subtypes.max()),)
        zeros = lambda: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        variances = torch.ones(shape, dtype=torch.float64, device=device)
        proportions = torch.full((n_subtypes.shape[1],), 1.0 / n_subtypes.shape[1], dtype=torch.float64, device=device)
        return cls(zeros(), variances, zeros(), proportions, n_subtypes)

    @property
    def subtype_mask(self) -> torch.Tensor:
        """Bool ``[N, K, Cmax]``: which entries are real subtypes."""
        c = torch.arange(self.means.shape[-1], device=self.means.device)
        return c < torch.as_tensor(self.n_subtypes, device=self.means.device).unsqueeze(-1)

    @property
    def log_weights(self) -> torch.Tensor:
        """``log τ`` with −inf on padding, ``[N, K, Cmax]``."""
        return torch.where(self.subtype_mask, torch.log(self.weights), torch.full_like(self.weights, -torch.inf))

    def to(self, device) -> "MixtureParams":
        return MixtureParams(self.means.to(device), self.variances.to(device), self.weights.to(device),
                             self.proportions.to(device), self.n_subtypes)

    def clone(self) -> "MixtureParams":
        return MixtureParams(self.means.clone(), self.variances.clone(), self.weights.clone(),
                             self.proportions.clone(), self.n_subtypes.copy())

    def to_dict(self) -> dict:
        """Nested lists without padding: ``means[i][k]`` is the list of that tissue's subtype means."""
        def unpad(t):
            return [[t[i, k, : self.n_subtypes[i, k]].tolist() for k in range(t.shape[1])] for i in range(t.shape[0])]
        return {"means": unpad(self.means.cpu()), "variances": unpad(self.variances.cpu()),
                "weights": unpad(self.weights.cpu()), "proportions": self.proportions.cpu().tolist()}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "MixtureParams":
        n_subtypes = np.array([[len(c) for c in row] for row in d["means"]], dtype=np.int64)
        params = cls.empty(n_subtypes, device=device)
        for name in ("means", "variances", "weights"):
            target = getattr(params, name)
            for i, row in enumerate(d[name]):
                for k, values in enumerate(row):
                    target[i, k, : len(values)] = torch.as_tensor(values, dtype=torch.float64)
        params.proportions[:] = torch.as_tensor(d["proportions"], dtype=torch.float64)
        return params
