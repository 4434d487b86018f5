"""The multivariate mixture's likelihood as pure, batched, differentiable torch functions.

This is the one implementation of the model (docs/model.md) that every solver uses: the EM
estimator (:class:`~mvmm.mixture.model.MultivariateMixture`) calls it in its loop, the joint solver
differentiates it with respect to the transforms, and networks train on it as their loss.

Shapes: B subjects, N images, K tissues, Cmax subtypes (padded), ``*S`` any trailing shape —
a grid ``(D, H, W)`` or ``(H, W)``, or the flattened voxels ``(V,)`` of a region of interest.

- images ``[B, N, *S]``: intensities. Must be finite everywhere (put 0 where an image does not
  cover a voxel): an uncovered NaN would poison the gradient even though it is masked out.
- coverage ``[B, N, *S]`` bool: where image i counts (hetero-coverage).
- log_atlas ``[B, K, *S]`` or None: log of the spatial prior A_k (an atlas warped to the
  subject, or a network's log-prior; need not be normalised); None is a plain mixture.
- params: :class:`~mvmm.mixture.params.MixtureParams`.

Nothing here checks its inputs or synchronises with the device: the estimators and commands
check once at the boundary, then call these functions in their loops.

The model, for voxel x::

    log p(I(x) | k) = Σ_i M_i(x) log Σ_c τ_ikc N(I_i(x); μ_ikc, σ²_ikc)
    log π_kx        = log π_k + log A_kx − log Σ_j π_j A_jx
    log p(I(x))     = log Σ_k exp(log π_kx + log p(I(x) | k))
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from mvmm.mixture.params import MixtureParams

LOG_2PI = math.log(2.0 * math.pi)
MIN_SUBTYPE_MASS = 1.0  # a subtype explaining less than one voxel's worth of data has collapsed
MIN_WEIGHT = 1e-10  # floor on τ so that a collapsed subtype keeps a finite log-weight
_CHUNK = 1 << 20  # voxels per float64 accumulation chunk: bounds memory on large volumes


def _trailing(t: torch.Tensor, n_spatial: int) -> torch.Tensor:
    """``t [...]`` reshaped to broadcast against ``n_spatial`` trailing spatial dimensions."""
    return t.reshape(tuple(t.shape) + (1,) * n_spatial)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log Σ exp(x)`` along ``dim`` (dropped); −inf entries allowed, not all of them.

    Written out because ``torch.logsumexp`` is several times slower on CPU when reducing a short,
    non-innermost axis such as the subtype axis of ``[B, K, C, *S]``.
    """
    peak = x.amax(dim=dim, keepdim=True).detach()
    return (peak + (x - peak).exp().sum(dim=dim, keepdim=True).log()).squeeze(dim)


# ---------------------------------------------------------------------------- densities
def subtype_log_densities(image: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                          log_weights: torch.Tensor) -> torch.Tensor:
    """``log τ_kc + log N(x; μ_kc, σ²_kc)`` for one image of each subject.

    Parameters
    ----------
    image : torch.Tensor, shape [B, *S]
    means, variances, log_weights : torch.Tensor, shape [B, K, Cmax]

    Returns
    -------
    torch.Tensor, shape [B, K, Cmax, *S]
    """
    n = image.dim() - 1
    means, variances, log_weights = (_trailing(t.to(image.dtype), n) for t in (means, variances, log_weights))
    x = image.unsqueeze(1).unsqueeze(1)
    return log_weights - 0.5 * (LOG_2PI + torch.log(variances) + (x - means) ** 2 / variances)


def tissue_log_likelihood(images: torch.Tensor, coverage: torch.Tensor, params: MixtureParams,
                          keep_within: bool = False) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """``log p(I(x) | k) = Σ_i M_i(x) log Σ_c τ_ikc N(I_i(x); μ_ikc, σ²_ikc)``.

    Parameters
    ----------
    images : torch.Tensor, shape [B, N, *S]
    coverage : torch.Tensor, bool, shape [B, N, *S]
    params : MixtureParams
    keep_within : bool
        Also return, per image, the subtype responsibilities ``P(c | k, x)`` (the M-step needs them).

    Returns
    -------
    log_lik : torch.Tensor, shape [B, K, *S]
    within : list of N torch.Tensor, shape [B, K, Cmax, *S], or None
    """
    log_lik = None
    within = [] if keep_within else None
    for i in range(images.shape[1]):
        log_dens = subtype_log_densities(images[:, i], params.means[:, i], params.variances[:, i],
                                         params.log_weights[:, i])
        per_tissue = logsumexp(log_dens, dim=2)
        counted = torch.where(coverage[:, i].unsqueeze(1), per_tissue, torch.zeros_like(per_tissue))
        log_lik = counted if log_lik is None else log_lik + counted
        if keep_within:
            within.append((log_dens - per_tissue.unsqueeze(2)).exp())
    return log_lik, within


def log_prior(log_atlas: Optional[torch.Tensor], log_proportions: torch.Tensor, n_spatial: int) -> torch.Tensor:
    """``log π_kx = log π_k + log A_kx − log Σ_j π_j A_jx``.

    Parameters
    ----------
    log_atlas : torch.Tensor, shape [B, K, *S], or None
        None: a plain mixture, ``log π_kx = log π_k``.
    log_proportions : torch.Tensor, shape [B, K]
    n_spatial : int
        ``len(S)``.

    Returns
    -------
    torch.Tensor, shape [B, K, *S] (``[B, K, 1, …]`` without an atlas)
    """
    log_pi = _trailing(log_proportions, n_spatial)
    if log_atlas is None:
        return log_pi
    joint = log_pi.to(log_atlas.dtype) + log_atlas
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


def log_joint(images: Optional[torch.Tensor], coverage: torch.Tensor, params: MixtureParams,
              log_atlas: Optional[torch.Tensor] = None, log_lik: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log π_kx + log p(I(x) | k)``, shape ``[B, K, *S]``; ``log_lik``: that second term already
    computed (:func:`tissue_log_likelihood`; ``images`` is then not read)."""
    if log_lik is None:
        log_lik, _ = tissue_log_likelihood(images, coverage, params)
    return log_prior(log_atlas, params.log_proportions, coverage.dim() - 2).to(log_lik.dtype) + log_lik


def log_evidence(joint: torch.Tensor) -> torch.Tensor:
    """Per-voxel log-likelihood ``log p(I(x)) = log Σ_k exp(joint_k)`` (scikit-learn's
    ``score_samples``), ``[B, K, *S] → [B, *S]``."""
    return torch.logsumexp(joint, dim=1)


def log_posteriors(joint: torch.Tensor) -> torch.Tensor:
    """``log P_kx``, the tissue posteriors, ``[B, K, *S] → [B, K, *S]``."""
    return torch.log_softmax(joint, dim=1)


def most_probable_class(probabilities: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the class axis of ``[K, *S]`` → ``[*S]`` (int64; the first of tied classes).

    The classes are moved innermost first: on CPU, ``argmax(dim=0)`` strides across the volume and
    is about ten times slower on a cardiac volume.
    """
    k = probabilities.shape[0]
    flat = probabilities.reshape(k, -1).t().contiguous()
    return flat.argmax(dim=1).reshape(probabilities.shape[1:])


def labelled_cross_entropy(log_posterior: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``−mean log P(label(x))`` over the voxels whose label is known: the label term of the networks
    trained with a few label maps (semi-supervised).

    Parameters
    ----------
    log_posterior : torch.Tensor, shape [B, K, *S]
    labels : torch.Tensor, int64, shape [B, *S]
        Class indices; −1 where unknown.

    Returns
    -------
    torch.Tensor, scalar (0 when no label is known)
    """
    known = labels >= 0
    if not bool(known.any()):
        return torch.zeros((), dtype=log_posterior.dtype, device=log_posterior.device)
    picked = log_posterior.gather(1, labels.clamp_min(0).unsqueeze(1))[:, 0]
    return -picked[known].mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, *S]`` over ``mask [B, *S]`` per subject, ``[B]`` (0 where the mask is empty)."""
    total = torch.where(mask, values, torch.zeros_like(values)).flatten(1).sum(1)
    return total / mask.flatten(1).sum(1).clamp_min(1).to(total.dtype)


def negative_log_likelihood(images: Optional[torch.Tensor], coverage: torch.Tensor, params: MixtureParams,
                            log_atlas: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                            reduction: str = "mean", log_lik: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Negative log-likelihood of each subject: the loss of every solver (EM's objective, with sign).

    Parameters
    ----------
    images, coverage, params, log_atlas
        See the module docstring.
    mask : torch.Tensor, bool, shape [B, *S], optional
        The voxels that count (default: where at least one image covers them).
    reduction : {"mean", "sum"}
        Per subject, the mean over the masked voxels (the estimator's ``score``, negated) or the sum.
    log_lik : torch.Tensor, shape [B, K, *S], optional
        ``log p(I(x) | k)`` from :func:`tissue_log_likelihood`, when the images and ``params`` stay
        fixed over many calls (the joint solver's gradient steps on the atlas alone): ``images`` is
        then not read, and only the prior's part is evaluated.

    Returns
    -------
    torch.Tensor, shape [B]
    """
    if mask is None:
        mask = coverage.any(dim=1)
    if log_lik is None:
        log_lik, _ = tissue_log_likelihood(images, coverage, params)
    n_spatial = coverage.dim() - 2
    evidence = log_evidence(log_prior(log_atlas, params.log_proportions, n_spatial).to(log_lik.dtype) + log_lik)
    if reduction == "sum":
        return -torch.where(mask, evidence, torch.zeros_like(evidence)).flatten(1).sum(1)
    return -masked_mean(evidence, mask)


# ---------------------------------------------------------------------------- M-step
def sufficient_statistics(image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted zeroth, first and second moments over the voxels, accumulated in float64.

    Parameters
    ----------
    image : torch.Tensor, shape [B, *S]
    weights : torch.Tensor, shape [B, K, C, *S]

    Returns
    -------
    torch.Tensor, float64, shape [3, B, K, C]
        ``Σ w``, ``Σ w x`` and ``Σ w x²``.
    """
    x = image.reshape(image.shape[0], 1, -1)  # [B, 1, V]
    w = weights.reshape(weights.shape[0], weights.shape[1] * weights.shape[2], -1)  # [B, K·C, V]
    s = torch.zeros((3,) + tuple(w.shape[:2]), dtype=torch.float64, device=image.device)
    for start in range(0, x.shape[-1], _CHUNK):
        xc = x[..., start:start + _CHUNK].double()
        wc = w[..., start:start + _CHUNK].double()
        s[0] += wc.sum(-1)
        s[1] += (wc @ xc.transpose(1, 2)).squeeze(-1)
        s[2] += (wc @ (xc * xc).transpose(1, 2)).squeeze(-1)
    return s.reshape((3,) + tuple(weights.shape[:3]))


def moments(stats: torch.Tensor, var_floor: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Means and floored variances from :func:`sufficient_statistics`; where ``Σ w = 0`` the mean is 0
    and the variance the floor — meaningless, for the caller to replace (it checks the mass), but
    finite: a 0/0 there would put NaN into the gradient of a differentiated M-step (padding
    subtypes have no mass) even through ``torch.where``."""
    mass = torch.where(stats[0] > 0, stats[0], torch.ones_like(stats[0]))
    means = stats[1] / mass
    return means, torch.clamp(stats[2] / mass - means ** 2, min=var_floor)


class MStep(NamedTuple):
    """What :func:`m_step` returns: the new parameters and each subtype's data mass ``Σ_x P_ikcx``."""

    params: MixtureParams
    subtype_mass: torch.Tensor  # [B, N, K, Cmax], float64


def m_step(images: torch.Tensor, coverage: torch.Tensor, posteriors: torch.Tensor, within: List[torch.Tensor],
           params: MixtureParams, var_floor: torch.Tensor, log_atlas: Optional[torch.Tensor] = None,
           learn_proportions: bool = True, tied_variances: Optional[torch.Tensor] = None) -> MStep:
    """Closed-form updates of τ, μ, σ² (per image, coverage-weighted) and π (docs/model.md, "EM").

    The weight of subtype c of tissue k in image i at x is ``P_ikcx = M_i(x) P_kx P(c | k, x)``.
    A subtype with less than ``MIN_SUBTYPE_MASS`` of data keeps its mean and variance (collapse).

    Parameters
    ----------
    images, coverage : torch.Tensor, shape [B, N, *S]
    posteriors : torch.Tensor, shape [B, K, *S]
        Tissue posteriors ``P_kx`` (probabilities; 0 where a voxel does not count).
    within : list of N torch.Tensor, shape [B, K, Cmax, *S]
        ``P(c | k, x)`` of each image, from :func:`tissue_log_likelihood`.
    params : MixtureParams
        The current parameters (float64).
    var_floor : torch.Tensor, shape [B, N]
        Lower bound of each image's variances.
    log_atlas : torch.Tensor, shape [B, K, *S], or None
        For the proportions' fixed point with an atlas.
    learn_proportions : bool
        False keeps π (with an atlas: the prior is the atlas itself).
    tied_variances : torch.Tensor, bool, shape [N, K], optional
        Where true, the subtypes of tissue k in image i share one variance (their pooled
        within-subtype variance), so that they differ by their means only: levels of one tissue
        such as normal and enhanced myocardium. Untied, EM tends to fit a tissue's partial-volume
        tails with a narrow and a wide Gaussian at one mean instead (docs/model.md, "Pathology").

    Returns
    -------
    MStep

    Notes
    -----
    Every sum runs over all of ``*S``: give the counted voxels only (EM gathers its region of
    interest as ``[1, N, V]``), or zero posteriors where a voxel does not count and no atlas.
    The EM estimator computes the same statistics in one chunked pass with its E-step
    (:func:`mvmm.mixture.fused.em_pass`) and updates by :func:`params_from_statistics`.
    """
    stats = subtype_statistics(images, coverage, posteriors, within)
    log_proportions = params.log_proportions
    if learn_proportions or log_atlas is None:
        log_proportions = update_log_proportions(*proportion_statistics(posteriors, params.log_proportions, log_atlas))
    return params_from_statistics(stats, params, var_floor, log_proportions, tied_variances)


def subtype_statistics(images: torch.Tensor, coverage: torch.Tensor, posteriors: torch.Tensor,
                       within: List[torch.Tensor]) -> torch.Tensor:
    """Each subtype's weighted moments in each image, weights ``P_ikcx = M_i(x) P_kx P(c | k, x)``.

    Parameters
    ----------
    images, coverage : torch.Tensor, shape [B, N, *S]
    posteriors : torch.Tensor, shape [B, K, *S]
    within : list of N torch.Tensor, shape [B, K, Cmax, *S]

    Returns
    -------
    torch.Tensor, float64, shape [3, B, N, K, Cmax]
        ``Σ w``, ``Σ w x``, ``Σ w x²``.
    """
    return torch.stack([sufficient_statistics(images[:, i], within[i] * (posteriors * coverage[:, i].unsqueeze(1))
                                              .unsqueeze(2)) for i in range(images.shape[1])], dim=2)


def params_from_statistics(stats: torch.Tensor, params: MixtureParams, var_floor: torch.Tensor,
                           log_proportions: torch.Tensor, tied_variances: Optional[torch.Tensor] = None) -> MStep:
    """τ, μ, σ² from each subtype's weighted moments (the M-step of :func:`m_step`, shared by EM's fused pass).

    Parameters
    ----------
    stats : torch.Tensor, float64, shape [3, B, N, K, Cmax]
        ``Σ w``, ``Σ w x``, ``Σ w x²`` of each subtype in each image (:func:`sufficient_statistics`).
    params : MixtureParams
        The current parameters: a collapsed subtype keeps its mean and variance.
    var_floor : torch.Tensor, shape [B, N]
    log_proportions : torch.Tensor, shape [B, K]
        The new log π (:func:`update_log_proportions`, or the current ones when held).
    tied_variances : torch.Tensor, bool, shape [N, K], optional
        See :func:`m_step`.

    Returns
    -------
    MStep
    """
    mask = params.subtype_mask
    means, variances, log_weights = [], [], []
    for i in range(stats.shape[2]):
        s = stats[:, :, i]  # [3, B, K, Cmax]
        mu, var = moments(s, var_floor[:, i].reshape(-1, 1, 1))
        if tied_variances is not None and bool(tied_variances[i].any()):
            # Σ_c Σ_x w (x − μ_c)² / Σ_c Σ_x w over the tissue's subtypes
            residual = torch.where(mask[i], s[2] - s[1] ** 2 / s[0].clamp_min(1e-300), torch.zeros_like(s[2]))
            mass = torch.where(mask[i], s[0], torch.zeros_like(s[0])).sum(-1, keepdim=True)
            pooled = torch.clamp(residual.sum(-1, keepdim=True) / mass.clamp_min(1e-300),
                                 min=var_floor[:, i].reshape(-1, 1, 1))
            var = torch.where(tied_variances[i].to(var.device).unsqueeze(-1), pooled.expand_as(var), var)
        alive = (s[0] >= MIN_SUBTYPE_MASS) & mask[i]
        means.append(torch.where(alive, mu, params.means[:, i]))
        variances.append(torch.where(alive, var, params.variances[:, i]))
        total = s[0].sum(dim=-1, keepdim=True)
        tau = torch.where(total > 0, s[0] / total.clamp_min(1e-300), params.log_weights[:, i].exp())
        tau = torch.where(mask[i], tau.clamp_min(MIN_WEIGHT), torch.zeros_like(tau))
        # padding: −inf written in, not log(0) taken (whose gradient is NaN in a differentiated M-step)
        share = torch.where(mask[i], tau / tau.sum(dim=-1, keepdim=True), torch.ones_like(tau))
        log_weights.append(torch.where(mask[i], torch.log(share), torch.full_like(share, -torch.inf)))
    new = MixtureParams(torch.stack(means, 1), torch.stack(variances, 1), torch.stack(log_weights, 1),
                        log_proportions, params.n_subtypes)
    return MStep(new, stats[0])


def proportion_statistics(posteriors: torch.Tensor, log_proportions: torch.Tensor,
                          log_atlas: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the proportions' update sums over the voxels, float64 ``[B, K]`` each.

    Returns ``Σ_x P_kx`` and, with an atlas, ``Σ_x A_kx / Σ_j π_j A_jx`` (None without one).
    """
    counts = posteriors.double().flatten(2).sum(-1)
    if log_atlas is None:
        return counts, None
    atlas = log_atlas.flatten(2).exp().double()  # [B, K, V]; exp in the atlas's dtype (cheaper)
    mix = (log_proportions.double().exp().unsqueeze(-1) * atlas).sum(1, keepdim=True).clamp_min(1e-300)
    return counts, (atlas / mix).sum(-1)


def update_log_proportions(counts: torch.Tensor, atlas_mass: Optional[torch.Tensor]) -> torch.Tensor:
    """π_k ← Σ_x P_kx / Σ_x (A_kx / Σ_j π_j A_jx), normalised (an MM step: log L cannot decrease).

    Without an atlas (``atlas_mass`` None) this is the plain mixture's ``π_k ∝ Σ_x P_kx``.

    Parameters
    ----------
    counts, atlas_mass : torch.Tensor, float64, shape [B, K]
        From :func:`proportion_statistics` (or EM's fused pass).

    Returns
    -------
    torch.Tensor, float64, shape [B, K]
        The new log π.
    """
    new = counts if atlas_mass is None else counts / atlas_mass.clamp_min(1e-300)
    new = new.clamp_min(1e-300)
    return torch.log(new / new.sum(dim=-1, keepdim=True))
