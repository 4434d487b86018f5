"""The multivariate mixture model (docs/model.md) fitted by EM, with an optional Potts MRF.

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
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mvmm.mixture import functional as F
from mvmm.mixture.functional import MIN_SUBTYPE_MASS
from mvmm.mixture.fused import em_pass
from mvmm.mixture.init import params_from_tissue_weights, tissue_weights_from_kmeans
from mvmm.mixture.mrf import mean_field_potts
from mvmm.mixture.params import MixtureParams

log = logging.getLogger(__name__)

PRIOR_FLOOR = 1e-12  # atlas probabilities are clamped here before the log
# the constructor settings a params.json keeps (subtype counts are saved as fitted; progress and
# warm_start are not settings of the fit)
SAVED_SETTINGS = ("max_iter", "tol", "var_floor", "mrf_beta", "mrf_iter", "random_state", "learn_proportions",
                  "tied_variances")


def log_of_prior(prior: torch.Tensor) -> torch.Tensor:
    """``log A`` of atlas probabilities, clamped at ``PRIOR_FLOOR`` (an atlas may hold exact zeros)."""
    return torch.log(prior.clamp_min(PRIOR_FLOOR))


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the relative change of log L fell below ``tol``."""


class SubtypeCollapseWarning(UserWarning):
    """A subtype lost (nearly) all its data; its mean and variance are kept from before."""


@dataclass
class _Responsibilities:
    """What an E-step gives the M-step."""

    log_post: torch.Tensor  # [1, K, V] log P_kx (tissue posterior)
    within: Optional[List[torch.Tensor]]  # N tensors [1, K, C, V]: P(c | k, x) in image i
    log_likelihood: float  # mean log-likelihood per voxel


class _Sums(NamedTuple):
    """What an E-step gives the M-step: its sums over the voxels (:class:`mvmm.mixture.fused.EmPass`)."""

    log_likelihood: float  # mean log-likelihood per voxel at the parameters of the E-step
    stats: torch.Tensor  # [3, 1, N, K, Cmax] float64: Σ w, Σ w x, Σ w x² per subtype
    counts: torch.Tensor  # [1, K] float64: Σ_x P_kx
    atlas_mass: Optional[torch.Tensor]  # [1, K] float64: Σ_x A_kx / Σ_j π_j A_jx, None without an atlas


@dataclass
class _Voxels:
    """The region of interest of one fit, flattened: V voxels where at least one image counts.

    The functional core's layout with a batch of one and ``*S = (V,)``.
    """

    x: torch.Tensor  # [1, N, V] intensities (0 where not covered)
    m: torch.Tensor  # [1, N, V] bool coverage
    log_atlas: Optional[torch.Tensor]  # [1, K, V] log prior probabilities, or None
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
        Estimate the global proportions π_k (docs/model.md). With an atlas, False holds them
        equal, so that the prior is the atlas itself: the proportions then cannot shift every
        boundary of a blurred atlas towards the tissue whose Gaussian explains the most voxels
        (on MS-CMRSeg, the right ventricle spreading into the surrounding background). A plain
        mixture always learns them.
    tied_variances : array-like of bool, shape [N, K], optional
        Where true, the subtypes of tissue k in image i share one variance and differ by their
        means (:func:`mvmm.mixture.functional.m_step`): levels of one tissue, such as normal and
        scarred myocardium.
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
                 warm_start: bool = False, tied_variances=None):
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
        self.tied_variances = None if tied_variances is None else np.asarray(tied_variances, dtype=bool)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def fit(self, images, coverage=None, prior=None, spacing: Optional[Sequence[float]] = None, *,
            max_iter: Optional[int] = None, init_params: Optional[MixtureParams] = None,
            progress: Optional[bool] = None) -> "MultivariateMixture":
        """Estimate the parameters by EM (no autograd graph is built, whatever the inputs require).

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
        max_iter : int, optional
            EM iterations of this call (default: the estimator's ``max_iter``); the settings are
            not changed, so a solver can run a few steps at a time.
        progress : bool, optional
            A progress bar for this call (default: the estimator's ``progress``); a solver that
            fits a few steps at a time under its own bar passes False.
        init_params : MixtureParams, optional
            Start from these parameters (a batch of one) instead of initialising; with
            ``warm_start`` and no ``init_params``, from the fitted ones.

        Returns
        -------
        self
        """
        max_iter = self.max_iter if max_iter is None else int(max_iter)
        if max_iter < 1:
            raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        n_classes = self._n_classes(data)
        if init_params is None and self.warm_start and hasattr(self, "params_"):
            init_params = self.params_
        if init_params is not None:
            params = self._checked_params(init_params, data, n_classes, "init_params")
            self.n_subtypes_ = params.n_subtypes.copy()
            if not hasattr(self, "_collapsed"):
                self._collapsed = set()
        else:
            self.n_subtypes_ = self._resolve_subtypes(data.x.shape[1], n_classes)
            self._collapsed = set()
        self._floors = self._variance_floors(data)
        self._tied = self._tied_on(data, n_classes)  # once per fit, not per M-step
        if init_params is None:
            params = self._initial_params(data, n_classes)
        sums = self._em_pass(data, params)
        self.lower_bounds_ = [sums.log_likelihood]
        self.converged_ = False
        show = self.progress if progress is None else progress
        iterations = tqdm(range(1, max_iter + 1), desc="EM", unit="it", disable=not show, leave=False)
        for self.n_iter_ in iterations:
            params = self._m_step(sums, params)
            sums = self._em_pass(data, params)
            ll, previous = sums.log_likelihood, self.lower_bounds_[-1]
            self.lower_bounds_.append(ll)
            iterations.set_postfix(logL=f"{ll:.5f}")
            if abs(ll - previous) <= self.tol * abs(previous):
                self.converged_ = True
                break
        iterations.close()
        if not self.converged_:
            warnings.warn(f"EM did not converge in {max_iter} iterations (last relative change "
                          f"{abs(self.lower_bounds_[-1] - self.lower_bounds_[-2]) / abs(self.lower_bounds_[-2]):.2e}, "
                          f"tol {self.tol:g}); increase max_iter or tol", ConvergenceWarning,
                          stacklevel=3)  # 3: past no_grad's wrapper, at fit's caller
        self.params_ = params
        log.debug("EM: %d iterations, converged=%s, mean log-likelihood %.5f", self.n_iter_, self.converged_,
                  self.lower_bounds_[-1])
        return self

    @torch.no_grad()
    def adopt(self, params: MixtureParams, images, coverage=None, prior=None,
              spacing: Optional[Sequence[float]] = None) -> "MultivariateMixture":
        """Take ``params`` (e.g. a network's prediction) as the fitted parameters without an EM step;
        ``lower_bounds_`` holds their mean log-likelihood on the data, ``n_iter_`` is 0.

        Parameters
        ----------
        params : MixtureParams
            One subject.
        images, coverage, prior, spacing
            As :meth:`fit`.
        """
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        self._adopt(params, data)
        return self

    @torch.no_grad()
    def adopt_predict_proba(self, params: MixtureParams, images, coverage=None, prior=None,
                            spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
        """:meth:`adopt` then :meth:`predict_proba` on the same data, from one E-step where no MRF
        couples the voxels (a network's θ is the answer: its score and its posterior are one pass).

        Returns
        -------
        torch.Tensor, shape [K, *S]
        """
        if self.mrf_beta > 0:  # the posterior runs over the whole grid, the score over the counted voxels
            return self.adopt(params, images, coverage, prior, spacing).predict_proba(images, coverage, prior, spacing)
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        resp = self._adopt(params, data)
        return self._posterior_map(resp.log_post[0], data, prior, self.params_)

    def _adopt(self, params: MixtureParams, data: _Voxels) -> _Responsibilities:
        params = self._checked_params(params, data, self._n_classes(data), "params")
        self.n_subtypes_, self._collapsed = params.n_subtypes.copy(), set()
        self._floors = self._variance_floors(data)
        self.params_ = params
        resp = self._e_step(data, params, keep_within=False)
        self.lower_bounds_ = [resp.log_likelihood]
        self.n_iter_, self.converged_ = 0, False
        return resp

    @torch.no_grad()
    def predict_proba(self, images, coverage=None, prior=None, spacing=None) -> torch.Tensor:
        """Posterior tissue probabilities ``[K, *S]``; where no image counts, the prior."""
        self._check_fitted()
        # Where no image counts the posterior is the prior π_kx, which needs no densities: without an
        # MRF the E-step runs on the counted voxels only (a region of interest in a scanner's field of
        # view is a small part of it); an MRF couples neighbours, so it runs over the whole grid
        data = self._voxels(images, coverage, prior, spacing, roi_only=self.mrf_beta <= 0)
        params = self.params_.to(data.x.device)
        return self._posterior_map(self._e_step(data, params, keep_within=False).log_post[0], data, prior, params)

    @staticmethod
    def _posterior_map(log_post: torch.Tensor, data: _Voxels, prior, params: MixtureParams) -> torch.Tensor:
        """The posterior ``[K, *S]`` from the E-step's ``log_post [K, V]`` on ``data``'s voxels; elsewhere the prior."""
        shape = (log_post.shape[0],) + tuple(data.roi.shape)
        if bool(data.roi.all()):
            out = torch.empty(shape, dtype=log_post.dtype, device=log_post.device)
        else:
            flat = None if prior is None else log_of_prior(
                torch.as_tensor(prior, device=log_post.device).to(data.x.dtype).reshape(shape[0], -1)).unsqueeze(0)
            out = F.log_prior(flat, params.log_proportions, 1)[0].exp().to(log_post.dtype)
            out = out.expand(shape[0], data.roi.numel()).reshape(shape).clone()
        out[:, data.roi] = log_post.exp()
        return out

    @torch.no_grad()
    def predict_subtype_proba(self, images, coverage=None, prior=None, spacing=None) -> List[torch.Tensor]:
        """Which subtype explains each image, given the tissue: ``P(c | k, x)`` per image, ``[K, Cmax, *S]``.

        Subtypes are independent across images given the tissue (docs/model.md), so these are per
        image. Where image i does not count, its entries are the weights τ_ikc (no data: the prior);
        past ``n_subtypes_[i, k]`` they are 0. ``P(k, c | x)`` is this times :meth:`predict_proba`.
        """
        self._check_fitted()
        data = self._voxels(images, coverage, prior, spacing, roi_only=False)
        params = self.params_.to(data.x.device)
        _, within = F.tissue_log_likelihood(data.x, data.m, params, keep_within=True)
        shape = tuple(data.roi.shape)
        out = []
        for i, w in enumerate(within):
            tau = params.log_weights[0, i].exp().to(w.dtype).unsqueeze(-1)  # [K, Cmax, 1]
            w = torch.where(data.m[0, i], w[0], tau).nan_to_num(0.0)
            out.append(w.reshape(w.shape[:2] + shape))
        return out

    def predict(self, images, coverage=None, prior=None, spacing=None) -> torch.Tensor:
        """Most probable tissue index ``[*S]`` (int64, 0..K-1)."""
        return F.most_probable_class(self.predict_proba(images, coverage, prior, spacing))

    @torch.no_grad()
    def score(self, images, coverage=None, prior=None, spacing=None) -> float:
        """Mean log-likelihood per voxel where at least one image counts."""
        self._check_fitted()
        data = self._voxels(images, coverage, prior, spacing, roi_only=True)
        return self._e_step(data, self.params_.to(data.x.device), keep_within=False).log_likelihood

    def log_likelihood(self, images, coverage=None, prior=None, params: Optional[MixtureParams] = None,
                       log_atlas=None, tissue_log_lik: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean log-likelihood per covered voxel, as a differentiable tensor (the negated
        :func:`~mvmm.mixture.functional.negative_log_likelihood` of one subject).

        Gradients flow to ``images``, ``prior``/``log_atlas`` (e.g. through the warps that produced
        them) and to ``params`` when given; by default the fitted parameters, which are constants.
        Shapes are checked, values are not (no host synchronisation: call it in a loop).

        Parameters
        ----------
        images : torch.Tensor, shape [N, *S]
        coverage : torch.Tensor, bool, shape [N, *S], optional
        prior : torch.Tensor, shape [K, *S], optional
            Atlas probabilities (clamped at ``PRIOR_FLOOR`` before the log).
        params : MixtureParams, optional
            A batch of one (default: ``params_``).
        log_atlas : torch.Tensor, shape [K, *S], optional
            The log-prior directly (e.g. a network's), instead of ``prior``.
        tissue_log_lik : torch.Tensor, shape [K, *S], optional
            The images' ``log p(I(x) | k)`` under ``params`` (:meth:`tissue_log_likelihood`), when
            only the prior changes between calls: the joint solver's gradient steps on the atlas.
        """
        if params is None:
            self._check_fitted()
            params = self.params_
        images = torch.as_tensor(images)
        if coverage is None:
            coverage = torch.ones(images.shape, dtype=torch.bool, device=images.device)
        if prior is not None and log_atlas is not None:
            raise ValueError("log_likelihood: give prior or log_atlas, not both")
        if prior is not None:
            log_atlas = log_of_prior(torch.as_tensor(prior, device=images.device).to(images.dtype))
        self._check_shapes(images, coverage, log_atlas, params)
        x = None  # with the tissue term given, the images are not read again
        if tissue_log_lik is None:
            x = torch.where(coverage, images, torch.zeros_like(images)).unsqueeze(0)
        nll = F.negative_log_likelihood(x, coverage.unsqueeze(0), params.to(images.device),
                                        None if log_atlas is None else log_atlas.unsqueeze(0),
                                        log_lik=None if tissue_log_lik is None else tissue_log_lik.unsqueeze(0))
        return -nll[0]

    @torch.no_grad()
    def tissue_log_likelihood(self, images, coverage=None) -> torch.Tensor:
        """The images' ``log p(I(x) | k)`` under the fitted parameters, ``[K, *S]`` (0 where no image
        counts), for :meth:`log_likelihood`'s ``tissue_log_lik``."""
        self._check_fitted()
        images = torch.as_tensor(images)
        if coverage is None:
            coverage = torch.ones(images.shape, dtype=torch.bool, device=images.device)
        self._check_shapes(images, coverage, None, self.params_)
        x = torch.where(coverage, images, torch.zeros_like(images)).unsqueeze(0)
        log_lik, _ = F.tissue_log_likelihood(x, coverage.unsqueeze(0), self.params_.to(images.device))
        return log_lik[0]

    # fitted attributes as NumPy arrays of one subject (padding as NaN)
    def _padded(self, t: torch.Tensor) -> np.ndarray:
        self._check_fitted()
        a = t[0].detach().cpu().numpy().copy()
        a[~self.params_.subtype_mask.cpu().numpy()] = np.nan
        return a

    means_ = property(lambda self: self._padded(self.params_.means))
    variances_ = property(lambda self: self._padded(self.params_.variances))
    weights_ = property(lambda self: self._padded(self.params_.weights))
    proportions_ = property(lambda self: self.params_.proportions[0].detach().cpu().numpy())

    def unfitted_copy(self) -> "MultivariateMixture":
        """A new estimator with the same settings and no fitted state (scikit-learn's ``clone``)."""
        return type(self)(**self.get_params())

    def get_params(self) -> dict:
        """The constructor's settings, as scikit-learn's ``get_params``."""
        return {"n_subtypes": self.n_subtypes, "n_classes": self.n_classes, "max_iter": self.max_iter,
                "tol": self.tol, "var_floor": self.var_floor, "mrf_beta": self.mrf_beta, "mrf_iter": self.mrf_iter,
                "random_state": self.random_state, "learn_proportions": self.learn_proportions,
                "progress": self.progress, "warm_start": self.warm_start, "tied_variances": self.tied_variances}

    # ------------------------------------------------------------------ save / load
    def to_dict(self) -> dict:
        """Settings, fitted parameters and history as plain JSON-able values."""
        self._check_fitted()
        return {
            "settings": {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self.get_params().items()
                         if k in SAVED_SETTINGS},
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
    def _e_step(self, data: _Voxels, params: MixtureParams, keep_within: bool = True) -> _Responsibilities:
        """Posteriors under ``params`` (docs/model.md, "EM"), all in log space, by the functional core.

        The tissue posterior is ``log P_kx = log π_kx + log p(I(x)|k) − logsumexp_l(…)`` (or its
        mean-field MRF version); the subtype responsibilities ``P(c | k, x)`` in each image are
        kept for the M-step.
        """
        log_lik, within = F.tissue_log_likelihood(data.x, data.m, params, keep_within)
        joint = F.log_prior(data.log_atlas, params.log_proportions, 1).to(log_lik.dtype) + log_lik
        log_likelihood = float(F.log_evidence(joint).double().mean())
        log_post = mean_field_potts(joint[0], data.roi, self.mrf_beta, data.spacing, self.mrf_iter).unsqueeze(0)
        return _Responsibilities(log_post, within, log_likelihood)

    def _em_pass(self, data: _Voxels, params: MixtureParams) -> _Sums:
        """The E-step under ``params`` and the sums of the next M-step.

        Without an MRF, one blocked pass (:func:`mvmm.mixture.fused.em_pass`); with one, the
        posterior couples neighbours, so the functional core's E-step runs over the whole region
        first and the sums are taken from its tensors.
        """
        if self.mrf_beta <= 0:
            out = em_pass(data.x, data.m, params, data.log_atlas)
            return _Sums(float(out.log_likelihood[0]) / data.x.shape[-1], out.stats, out.counts, out.atlas_mass)
        resp = self._e_step(data, params)
        posteriors = resp.log_post.exp()
        counts, atlas_mass = F.proportion_statistics(posteriors, params.log_proportions, data.log_atlas)
        return _Sums(resp.log_likelihood, F.subtype_statistics(data.x, data.m, posteriors, resp.within), counts,
                     atlas_mass)

    def _m_step(self, sums: _Sums, params: MixtureParams) -> MixtureParams:
        """Closed-form updates of τ, μ, σ² and π (:func:`mvmm.mixture.functional.params_from_statistics`)."""
        log_proportions = params.log_proportions
        if self.learn_proportions or sums.atlas_mass is None:
            log_proportions = F.update_log_proportions(sums.counts, sums.atlas_mass)
        step = F.params_from_statistics(sums.stats, params, self._floors.unsqueeze(0), log_proportions, self._tied)
        collapsed = (step.subtype_mass[0] < MIN_SUBTYPE_MASS) & params.subtype_mask
        keys = map(tuple, collapsed.nonzero().tolist()) if bool(collapsed.any()) else ()
        for key in keys:  # warn once per subtype and fit
            if key not in self._collapsed:
                self._collapsed.add(key)
                image, k, c = key
                warnings.warn(f"subtype {c} of tissue {k} in image {image} has collapsed (it explains less than "
                              f"{MIN_SUBTYPE_MASS:g} voxel); its mean and variance are frozen. Consider fewer "
                              f"subtypes for this tissue.", SubtypeCollapseWarning,
                              stacklevel=4)  # past fit and no_grad's wrapper, at fit's caller
        return step.params

    # ------------------------------------------------------------------ set-up
    def _initial_params(self, data: _Voxels, n_classes: int) -> MixtureParams:
        x, m = data.x[0], data.m[0]
        if data.log_atlas is not None:
            weights = data.log_atlas[0].exp()
        else:
            weights = tissue_weights_from_kmeans(x, m, n_classes, self.random_state)
        return params_from_tissue_weights(x, m, weights, self.n_subtypes_, self._floors, self.tied_variances)

    def _tied_on(self, data: _Voxels, n_classes: int) -> Optional[torch.Tensor]:
        """``tied_variances`` as a bool tensor ``[N, K]`` on the data's device, checked (None: untied)."""
        if self.tied_variances is None:
            return None
        tied = torch.as_tensor(self.tied_variances, device=data.x.device)
        if tuple(tied.shape) != (data.x.shape[1], n_classes):
            raise ValueError(f"tied_variances: expected shape {[data.x.shape[1], n_classes]} (images × tissues), "
                             f"got {list(tied.shape)}")
        return tied

    def _variance_floors(self, data: _Voxels) -> torch.Tensor:
        x, m = data.x[0], data.m[0]
        floors = [self.var_floor * float(x[i, m[i]].double().var()) for i in range(x.shape[0])]
        return torch.as_tensor(floors, dtype=torch.float64, device=x.device)

    def _checked_params(self, params: MixtureParams, data: _Voxels, n_classes: int, argname: str) -> MixtureParams:
        n_images = data.x.shape[1]
        if params.batch_size != 1 or tuple(params.means.shape[1:3]) != (n_images, n_classes):
            raise ValueError(f"{argname}: expected parameters of 1 subject × {n_images} images × {n_classes} "
                             f"classes, got {list(params.means.shape[:3])}")
        return params.to(data.x.device, torch.float64)

    @staticmethod
    def _check_shapes(images: torch.Tensor, coverage: torch.Tensor, log_atlas, params: MixtureParams) -> None:
        """Shape checks only (no values: nothing here waits for the device)."""
        if images.dim() < 2 or images.shape[0] != params.means.shape[1]:
            raise ValueError(f"images: expected shape [N, *S] with N = {params.means.shape[1]} (the parameters' "
                             f"images), got {list(images.shape)}")
        if tuple(coverage.shape) != tuple(images.shape) or coverage.dtype != torch.bool:
            raise ValueError(f"coverage: expected a bool tensor of shape {list(images.shape)}, got "
                             f"{coverage.dtype} {list(coverage.shape)}")
        if params.batch_size != 1:
            raise ValueError(f"params: expected one subject, got a batch of {params.batch_size} (use "
                             f"mvmm.mixture.functional for batches)")
        if log_atlas is not None and tuple(log_atlas.shape) != (params.means.shape[2],) + tuple(images.shape[1:]):
            raise ValueError(f"prior: expected shape [{params.means.shape[2]}, "
                             f"{', '.join(map(str, images.shape[1:]))}], got {list(log_atlas.shape)}")

    def _n_classes(self, data: _Voxels) -> int:
        if data.log_atlas is not None:
            k = data.log_atlas.shape[1]
            if self.n_classes is not None and self.n_classes != k:
                raise ValueError(f"n_classes={self.n_classes} disagrees with the prior's {k} classes")
            return k
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
        if bool(roi.all()):  # every voxel counts: a view, not a gather (which costs seconds on a large volume)
            def gather(t):
                return t.reshape(t.shape[0], -1)
        else:
            def gather(t):
                return t[:, roi]
        log_atlas = log_of_prior(gather(prior)).unsqueeze(0) if prior is not None else None
        return _Voxels(gather(x).unsqueeze(0), gather(coverage).unsqueeze(0), log_atlas, roi, spacing)
