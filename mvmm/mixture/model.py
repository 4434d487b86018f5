"""The multivariate mixture model (DESIGN.md §1) fitted by EM, with an optional Potts MRF.

For voxel x of the common grid, N images and K tissues,

    p(I(x) | k) = Π_{i : M_i(x)} Σ_c τ_ikc N(I_i(x); μ_ikc, σ²_ikc)
    π_kx = π_k A_kx / Σ_j π_j A_jx        (A: atlas prior; A = 1 for a plain mixture)
    log L = Σ_{x ∈ roi} log Σ_k π_kx p(I(x) | k)

Everything that mixes densities is done in log space. The interface follows scikit-learn's mixture
module: ``fit`` / ``predict`` / ``predict_proba`` / ``score``, fitted state ending in an underscore.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mvmm.mixture.gaussian import logsumexp, subtype_log_densities, sufficient_statistics, weighted_moments
from mvmm.mixture.init import params_from_tissue_weights, tissue_weights_from_kmeans
from mvmm.mixture.mrf import mean_field_potts
from mvmm.mixture.params import MixtureParams

log = logging.getLogger(__name__)

MIN_SUBTYPE_MASS = 1.0  # a subtype explaining less than one voxel's worth of data has collapsed
MIN_WEIGHT = 1e-10  # floor on τ so that a collapsed subtype keeps a finite log-weight
PRIOR_FLOOR = 1e-12  # atlas probabilities are clamped here before the log


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the relative change of log L fell below ``tol``."""


class SubtypeCollapseWarning(UserWarning):
    """A subtype lost (nearly) all its data; its mean and variance are kept from before."""


@dataclass
class _Responsibilities:
    """What an E-step gives the M-step."""

    log_post: torch.Tensor  # [K, V] log P_kx (tissue posterior)
    within: List[torch.Tensor]  # N tensors [K, C, V]: P(c | k, x) in image i
    log_likelihood: float  # mean log-likelihood per voxel


@dataclass
class _Voxels:
    """The region of interest of one fit, flattened: V voxels where at least one image counts."""

    x: torch.Tensor  # [N, V] intensities (0 where not covered)
    m: torch.Tensor  # [N, V] bool coverage
    atlas: Optional[torch.Tensor]  # [K, V] prior probabilities, or None
    roi: torch.Tensor  # [*S] bool
    spacing: Sequence[float]


class MultivariateMixture:
    """Multivariate mixture of per-tissue Gaussian subtypes with atlas priors and hetero-coverage.

    Parameters
    ----------
    n_subtypes : int or array-like of int, shape [N, K]
        Gaussian subtypes per image and tissue (e.g. 2 for Myo in LGE: normal and scar).
    n_classes : int, optional
        Number of tissues K for a plain mixture (no prior); taken from the prior otherwise.
    max_iter : int
        Maximum number of EM iterations.
    tol : float
        Convergence threshold on the relative change of the mean log-likelihood per voxel.
    var_floor : float
        Variances are kept above ``var_floor`` times the variance of each image over its coverage.
    mrf_beta : float
        Weight of the Potts MRF smoothing of the posterior (0: none).
    mrf_iter : int
        Mean-field iterations per E-step when ``mrf_beta > 0``.
    random_state : int, optional
        Seed of the k-means initialisation of a plain mixture.
    learn_proportions : bool
        Estimate the global proportions π_k (DESIGN.md §1). With an atlas, False holds them
        equal, so that the prior is the atlas itself: the proportions then cannot shift every
        boundary of a blurred atlas towards the tissue whose Gaussian explains the most voxels
        (on MS-CMRSeg, the right ventricle spreading into the surrounding background). A plain
        mixture always learns them.
    progress : bool
        Show a tqdm progress bar over EM iterations.
    warm_start : bool
        When fitted already, ``fit`` starts from the current parameters instead of initialising
        (as in scikit-learn); the joint solver refits after each registration step this way.

    Attributes
    ----------
    params_ : MixtureParams
        Fitted appearance parameters and proportions.
    means_, variances_, weights_ : np.ndarray, shape [N, K, Cmax]
        μ, σ², τ (NaN on padding past ``n_subtypes_``).
    proportions_ : np.ndarray, shape [K]
    n_subtypes_ : np.ndarray of int, shape [N, K]
    lower_bounds_ : list of float
        Mean log-likelihood per voxel of the region of interest: at the initial parameters, then
        after each iteration. Without MRF it never decreases.
    converged_ : bool
    n_iter_ : int
    """

    def __init__(self, n_subtypes=1, n_classes: Optional[int] = None, max_iter: int = 200, tol: float = 1e-5,
                 var_floor: float = 1e-3, mrf_beta: float = 0.0, mrf_iter: int = 5,
                 random_state: Optional[int] = None, learn_proportions: bool = True, progress: bool = False,
                 warm_start: bool = False):
        if int(max_iter) < 1:
            raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
        if not tol > 0:
            raise ValueError(f"tol: expected > 0, got {tol}")
        if not var_floor > 0:
            raise ValueError(f"var_floor: expected > 0, got {var_floor}")
        if mrf_beta < 0:
            raise ValueError(f"mrf_beta: expected >= 0, got {mrf_beta}")
        self.n_subtypes = n_subtypes
        self.n_classes = n_classes
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.var_floor = float(var_floor)
        self.mrf_beta = float(mrf_beta)
        self.mrf_iter = int(mrf_iter)
        self.random_state = random_state
        self.learn_proportions = bool(learn_proportions)
        self.progress = progress
        self.warm_start = warm_start

    # ------------------------------------------------------------------ public API
    def fit(self, images, coverage=None, prior=None, spacing: Optional[Sequence[float]] = None) -> "MultivariateMixture":
        """Estimate the parameters by EM.

        Parameters
        ----------
        images : torch.Tensor or np.ndarray, shape [N, *S]
            N images on one grid (S = (D, H, W) or (H, W)).
        coverage : bool tensor, shape [N, *S], optional
            Where each image counts (default: everywhere).
        prior : tensor, shape [K, *S], optional
            Atlas probabilities A_k; without it the model is a plain mixture of ``n_classes``.
        spacing : sequence of float, ITK order, optional
            Voxel spacing, used by the MRF (default: isotropic).

        Returns
        -------
        self
        """
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        n_classes = self._n_classes(data)
        if self.warm_start and hasattr(self, "params_"):
            params = self.params_.to(data.x.device)
            if tuple(params.means.shape[:2]) != (data.x.shape[0], n_classes):
                raise ValueError(f"warm_start: the fitted model has {params.means.shape[0]} images × "
                                 f"{params.means.shape[1]} classes, the data {data.x.shape[0]} × {n_classes}")
        else:
            self.n_subtypes_ = self._resolve_subtypes(data.x.shape[0], n_classes)
            self._collapsed = set()
            params = None
        self._floors = self._variance_floors(data)
        if params is None:
            params = self._initial_params(data, n_classes)
        resp = self._e_step(data, params)
        self.lower_bounds_ = [resp.log_likelihood]
        self.converged_ = False
        iterations = tqdm(range(1, self.max_iter + 1), desc="EM", unit="it", disable=not self.progress, leave=False)
        for self.n_iter_ in iterations:
            params = self._m_step(data, resp, params)
            resp = self._e_step(data, params)
            ll, previous = resp.log_likelihood, self.lower_bounds_[-1]
            self.lower_bounds_.append(ll)
            iterations.set_postfix(logL=f"{ll:.5f}")
            if abs(ll - previous) <= self.tol * abs(previous):
                self.converged_ = True
                break
        iterations.close()
        if not self.converged_:
            warnings.warn(f"EM did not converge in {self.max_iter} iterations (last relative change "
                          f"{abs(self.lower_bounds_[-1] - self.lower_bounds_[-2]) / abs(self.lower_bounds_[-2]):.2e}, "
                          f"tol {self.tol:g}); increase max_iter or tol", ConvergenceWarning, stacklevel=2)
        self.params_ = params
        log.info("EM: %d iterations, converged=%s, mean log-likelihood %.5f", self.n_iter_, self.converged_,
                 self.lower_bounds_[-1])
        return self

    def predict_proba(self, images, coverage=None, prior=None, spacing=None) -> torch.Tensor:
        """Posterior tissue probabilities ``[K, *S]``; where no image counts, the prior."""
        self._check_fitted()
        data = self._voxels(images, coverage, prior, spacing, roi_only=False)
        log_post = self._e_step(data, self.params_.to(data.x.device), keep_within=False).log_post
        out = torch.empty((log_post.shape[0],) + tuple(data.roi.shape), dtype=log_post.dtype, device=log_post.device)
        out[:, data.roi] = log_post.exp()
        return out

    def predict(self, images, coverage=None, prior=None, spacing=None) -> torch.Tensor:
        """Most probable tissue index ``[*S]`` (int64, 0..K-1)."""
        return self.predict_proba(images, coverage, prior, spacing).argmax(dim=0)

    def score(self, images, coverage=None, prior=None, spacing=None) -> float:
        """Mean log-likelihood per voxel where at least one image counts."""
        self._check_fitted()
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        return self._e_step(data, self.params_.to(data.x.device), keep_within=False).log_likelihood

    def log_likelihood(self, images, coverage=None, prior=None) -> torch.Tensor:
        """Mean log-likelihood per covered voxel under the fitted parameters, as a differentiable tensor.

        Gradients flow to ``images`` and ``prior`` (e.g. through the warps that produced them),
        not to the appearance parameters: this is the registration half of the joint solver.
        """
        self._check_fitted()
        data = self._voxels(images, coverage, prior, None, roi_only=True)
        log_joint, _ = self._log_joint(data, self.params_.to(data.x.device), keep_within=False)
        return torch.logsumexp(log_joint, dim=0).mean()

    # fitted attributes as NumPy arrays (padding as NaN)
    def _padded(self, t: torch.Tensor) -> np.ndarray:
        self._check_fitted()
        a = t.detach().cpu().numpy().copy()
        a[~self.params_.subtype_mask.cpu().numpy()] = np.nan
        return a

    means_ = property(lambda self: self._padded(self.params_.means))
    variances_ = property(lambda self: self._padded(self.params_.variances))
    weights_ = property(lambda self: self._padded(self.params_.weights))
    proportions_ = property(lambda self: self.params_.proportions.detach().cpu().numpy())

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        """Settings, fitted parameters and history as plain JSON-able values."""
        self._check_fitted()
        return {
            "settings": {"max_iter": self.max_iter, "tol": self.tol, "var_floor": self.var_floor,
                         "mrf_beta": self.mrf_beta, "mrf_iter": self.mrf_iter, "random_state": self.random_state,
                         "learn_proportions": self.learn_proportions},
            "n_subtypes": self.n_subtypes_.tolist(),
            "params": self.params_.to_dict(),
            "converged": self.converged_, "n_iter": self.n_iter_, "lower_bounds": self.lower_bounds_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MultivariateMixture":
        """Rebuild a fitted model from :meth:`to_dict` output (e.g. a params.json)."""
        model = cls(n_subtypes=np.asarray(d["n_subtypes"]), **d["settings"])
        model.params_ = MixtureParams.from_dict(d["params"])
        model.n_subtypes_ = model.params_.n_subtypes
        model.converged_, model.n_iter_, model.lower_bounds_ = d["converged"], d["n_iter"], list(d["lower_bounds"])
        return model

    # ------------------------------------------------------------------ EM steps
    def _log_prior(self, data: _Voxels, params: MixtureParams) -> torch.Tensor:
        """``log π_kx``, shape [K, V] (or [K, 1] for a plain mixture)."""
        log_pi = torch.log(params.proportions).to(data.x.dtype).unsqueeze(1)
        if data.atlas is None:
            return log_pi
        joint = log_pi + torch.log(data.atlas.clamp_min(PRIOR_FLOOR))
        return joint - torch.logsumexp(joint, dim=0, keepdim=True)

    def _e_step(self, data: _Voxels, params: MixtureParams, keep_within: bool = True) -> _Responsibilities:
        """Posteriors under ``params`` (DESIGN.md §1, E-step), all in log space.

        ``log p(I(x)|k) = Σ_i M_i(x) logsumexp_c(log τ_ikc + log N_ikc(x))``; the tissue posterior is
        ``log P_kx = log π_kx + log p(I(x)|k) − logsumexp_l(…)`` (or its mean-field MRF version), and
        the subtype responsibilities ``P(c | k, x)`` in each image are kept for the M-step.
        """
        log_joint, within = self._log_joint(data, params, keep_within)
        log_likelihood = float(torch.logsumexp(log_joint, dim=0).double().mean())
        log_post = mean_field_potts(log_joint, data.roi, self.mrf_beta, data.spacing, self.mrf_iter)
        return _Responsibilities(log_post, within, log_likelihood)

    def _log_joint(self, data: _Voxels, params: MixtureParams, keep_within: bool):
        """``log π_kx + Σ_i M_i(x) log p(I_i(x) | k)``, [K, V], and (optionally) ``P(c | k, x)`` per image."""
        log_weights = params.log_weights
        log_lik = torch.zeros((params.means.shape[1], data.x.shape[1]), dtype=data.x.dtype, device=data.x.device)
        within = []
        for i in range(data.x.shape[0]):
            log_dens = subtype_log_densities(data.x[i], params.means[i], params.variances[i], log_weights[i])
            per_tissue = logsumexp(log_dens, dim=1)
            log_lik = log_lik + torch.where(data.m[i], per_tissue, torch.zeros_like(per_tissue))
            if keep_within:
                within.append((log_dens - per_tissue.unsqueeze(1)).exp())
        return self._log_prior(data, params) + log_lik, within

    def _m_step(self, data: _Voxels, resp: _Responsibilities, params: MixtureParams) -> MixtureParams:
        """Closed-form updates of τ, μ, σ² (per image, coverage-weighted) and of π (fixed point).

        The weight of subtype c of tissue k in image i at x is ``P_ikcx = M_i(x) P_kx P(c | k, x)``.
        """
        post = resp.log_post.exp()
        new = params.clone()
        mask = params.subtype_mask
        for i in range(data.x.shape[0]):
            s0, s1, s2 = sufficient_statistics(data.x[i], resp.within[i] * (post * data.m[i]).unsqueeze(1))
            means, variances = weighted_moments(s0, s1, s2, self._floors[i])
            alive = (s0 >= MIN_SUBTYPE_MASS) & mask[i]
            new.means[i] = torch.where(alive, means, params.means[i])
            new.variances[i] = torch.where(alive, variances, params.variances[i])
            mass = s0.sum(dim=1, keepdim=True)
            weights = torch.where(mass > 0, s0 / mass.clamp_min(1e-300), params.weights[i])
            weights = torch.where(mask[i], weights.clamp_min(MIN_WEIGHT), torch.zeros_like(weights))
            new.weights[i] = weights / weights.sum(dim=1, keepdim=True)
            self._warn_collapsed(i, (~alive & mask[i]).nonzero().tolist())
        new.proportions = self._update_proportions(data, post, params.proportions)
        return new

    def _update_proportions(self, data: _Voxels, post: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
        """π_k ← Σ_x P_kx / Σ_x A_kx / Σ_j π_j A_jx, normalised (an MM step: log L cannot decrease)."""
        if data.atlas is not None and not self.learn_proportions:
            return proportions
        counts = post.double().sum(dim=1)
        if data.atlas is None:
            new = counts
        else:
            atlas = data.atlas.double()
            mix = (proportions.unsqueeze(1) * atlas).sum(dim=0).clamp_min(1e-300)
            new = counts / (atlas / mix).sum(dim=1).clamp_min(1e-300)
        new = new.clamp_min(1e-300)
        return new / new.sum()

    def _warn_collapsed(self, image: int, entries) -> None:
        for k, c in entries:
            key = (image, k, c)
            if key not in self._collapsed:
                self._collapsed.add(key)
                warnings.warn(f"subtype {c} of tissue {k} in image {image} has collapsed (it explains less than "
                              f"{MIN_SUBTYPE_MASS:g} voxel); its mean and variance are frozen. Consider fewer "
                              f"subtypes for this tissue.", SubtypeCollapseWarning, stacklevel=3)

    # ------------------------------------------------------------------ set-up
    def _initial_params(self, data: _Voxels, n_classes: int) -> MixtureParams:
        if data.atlas is not None:
            weights = data.atlas
        else:
            weights = tissue_weights_from_kmeans(data.x, data.m, n_classes, self.random_state)
        return params_from_tissue_weights(data.x, data.m, weights, self.n_subtypes_, self._floors)

    def _variance_floors(self, data: _Voxels) -> torch.Tensor:
        floors = [self.var_floor * float(data.x[i, data.m[i]].double().var()) for i in range(data.x.shape[0])]
        return torch.as_tensor(floors, dtype=torch.float64, device=data.x.device)

    def _n_classes(self, data: _Voxels) -> int:
        if data.atlas is not None:
            if self.n_classes is not None and self.n_classes != data.atlas.shape[0]:
                raise ValueError(f"n_classes={self.n_classes} disagrees with the prior's {data.atlas.shape[0]} classes")
            return data.atlas.shape[0]
        if self.n_classes is None or self.n_classes < 2:
            raise ValueError("n_classes: a plain mixture (no prior) needs n_classes >= 2")
        return int(self.n_classes)

    def _resolve_subtypes(self, n_images: int, n_classes: int) -> np.ndarray:
        counts = np.asarray(self.n_subtypes, dtype=np.int64)
        counts = np.broadcast_to(counts, (n_images, n_classes)).copy() if counts.ndim == 0 else counts
        if counts.shape != (n_images, n_classes):
            raise ValueError(f"n_subtypes: expected an int or shape [{n_images}, {n_classes}], got {counts.shape}")
        if (counts < 1).any():
            raise ValueError("n_subtypes: every count must be >= 1")
        return counts

    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise RuntimeError("this MultivariateMixture is not fitted yet: call fit() first")

    def _voxels(self, images, coverage, prior, spacing, roi_only: bool) -> _Voxels:
        images = torch.as_tensor(images)
        if not images.is_floating_point():
            images = images.float()
        if images.dim() < 2:
            raise ValueError(f"images: expected shape [N, *S], got {list(images.shape)}")
        shape = tuple(images.shape[1:])
        if coverage is None:
            coverage = torch.ones(images.shape, dtype=torch.bool, device=images.device)
        coverage = torch.as_tensor(coverage, device=images.device)
        if coverage.shape != images.shape or coverage.dtype != torch.bool:
            raise ValueError(f"coverage: expected a bool tensor of shape {list(images.shape)}, got "
                             f"{coverage.dtype} {list(coverage.shape)}")
        if not bool(torch.isfinite(images[coverage]).all()):
            raise ValueError("images: NaN or Inf values where coverage is True")
        if prior is not None:
            prior = torch.as_tensor(prior, device=images.device).to(images.dtype)
            if tuple(prior.shape[1:]) != shape:
                raise ValueError(f"prior: expected shape [K, {', '.join(map(str, shape))}], got {list(prior.shape)}")
            if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()) or bool((prior.sum(0) <= 0).any()):
                raise ValueError("prior: probabilities must be finite, >= 0, and not all 0 at a voxel")
        roi = coverage.any(dim=0) if roi_only else torch.ones(shape, dtype=torch.bool, device=images.device)
        if not bool(roi.any()):
            raise ValueError("coverage: no voxel is covered by any image")
        spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
        x = torch.where(coverage, images, torch.zeros_like(images))
        return _Voxels(x[:, roi], coverage[:, roi], prior[:, roi] if prior is not None else None, roi, spacing)
