"""EM's E-step and the next M-step's sums in one pass over the voxels, chunk by chunk.

The functional core (:mod:`mvmm.mixture.functional`) builds full ``[B, K, Cmax, V]`` tensors per
image, keeps them for the M-step and accumulates the moments in float64: clear, differentiable,
and what networks train on, but on a large volume every step streams hundreds of MB through
memory several times. EM needs none of those tensors afterwards, only their sums, so this pass
evaluates the same quantities on blocks of voxels small enough to stay in the CPU's cache and adds
up, per block:

- the log-likelihood ``Σ_x log p(I(x))`` at the current parameters,
- each subtype's weighted moments ``Σ w``, ``Σ w d``, ``Σ w d²`` with ``w = P_ikcx`` and
  ``d = x − μ_ikc`` (centred on the subtype's current mean, so that float32 sums lose nothing to
  cancellation; converted to raw moments in float64 at the end),
- the proportions' sums ``Σ_x P_kx`` and ``Σ_x A_kx / Σ_j π_j A_jx``.

Within a block everything is in the images' dtype (float32); blocks are summed in float64. The
M-step then runs on these sums (:func:`mvmm.mixture.functional.params_from_statistics`), so the
update is the functional core's, and ``tests/test_fused.py`` checks both against each other.

The tissue posterior here is the plain one (``softmax`` of the joint); a Potts MRF couples
neighbouring voxels and goes through the functional core instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mvmm.mixture.functional import LOG_2PI
from mvmm.mixture.params import MixtureParams

# voxels per block: on CPU a block's [B, N, K, Cmax, n] float32 work tensors (1.5 MB each for
# 3 images × 4 tissues × 2 subtypes) stay in cache; 16k was the fastest of 8k–256k for one pass over
# em_speed.py's 6.9 M-voxel case on 2 cores (2026-12-05). On a GPU blocks only bound the memory.
CPU_BLOCK = 1 << 14
GPU_BLOCK = 1 << 22


class EmPass(NamedTuple):
    """What :func:`em_pass` returns, all float64."""

    log_likelihood: torch.Tensor  # [B] Σ_x log p(I(x)) over the voxels
    stats: torch.Tensor  # [3, B, N, K, Cmax] Σ w, Σ w x, Σ w x² per subtype
    counts: torch.Tensor  # [B, K] Σ_x P_kx
    atlas_mass: Optional[torch.Tensor]  # [B, K] Σ_x A_kx / Σ_j π_j A_jx, None without an atlas


def _fold(t: torch.Tensor, dim: int, op) -> torch.Tensor:
    """Reduce a short axis ``dim`` of ``t`` by ``op`` over its slices (``dim`` dropped; a new tensor).

    On CPU, reducing a short axis that is not the innermost one slice by slice (``torch.add``,
    ``torch.maximum``) is several times faster than ``sum`` / ``amax``, which stride across it.
    """
    out = op(t.select(dim, 0), t.select(dim, 1)) if t.shape[dim] > 1 else t.select(dim, 0).clone()
    for j in range(2, t.shape[dim]):
        out = op(out, t.select(dim, j), out=out)
    return out


def _softmax_parts(logits: torch.Tensor, dim: int):
    """``(log Σ exp, softmax)`` along a short axis ``dim`` with one ``exp``, the softmax written over
    ``logits`` (which it consumes): ``([…], […])``, the first with ``dim`` dropped."""
    peak = _fold(logits, dim, torch.maximum)
    e = logits.sub_(peak.unsqueeze(dim)).exp_()
    total = _fold(e, dim, torch.add)
    softmax = e.div_(total.unsqueeze(dim))
    return total.log_().add_(peak), softmax


def em_pass(images: torch.Tensor, coverage: torch.Tensor, params: MixtureParams,
            log_atlas: Optional[torch.Tensor] = None, block: Optional[int] = None) -> EmPass:
    """The E-step at ``params`` and the sums its M-step needs, in blocks of voxels (no autograd).

    Parameters
    ----------
    images : torch.Tensor, shape [B, N, V]
        Intensities (0 where not covered), floating point; the blocks compute in this dtype.
    coverage : torch.Tensor, bool, shape [B, N, V]
    params : MixtureParams
    log_atlas : torch.Tensor, shape [B, K, V], or None
    block : int, optional
        Voxels per block (default: ``CPU_BLOCK`` on CPU, ``GPU_BLOCK`` elsewhere).

    Returns
    -------
    EmPass
    """
    dtype, device = images.dtype, images.device
    n_batch, n_images, n_voxels = images.shape
    n_classes, n_sub = params.means.shape[2], params.means.shape[3]
    if block is None:
        block = CPU_BLOCK if device.type == "cpu" else GPU_BLOCK
    n_blocks = -(-n_voxels // block)
    # log τ − ½ (log 2π + log σ²) − (x − μ)² / (2σ²) = offset + d · (−d / (2σ²)), d = x − μ, for all
    # images at once, [B, N, K, Cmax, 1]
    mu = params.means.to(dtype).unsqueeze(-1)
    neg_half_precision = (-0.5 / params.variances).to(dtype).unsqueeze(-1)
    offset = (params.log_weights - 0.5 * (LOG_2PI + torch.log(params.variances))).to(dtype).unsqueeze(-1)
    log_pi = params.log_proportions.to(dtype if log_atlas is None else log_atlas.dtype).unsqueeze(-1)  # [B, K, 1]
    # each block's sums in the blocks' dtype, added up in float64 at the end
    partial = {"log_likelihood": images.new_empty((n_blocks, n_batch)),
               "counts": images.new_empty((n_blocks, n_batch, n_classes)),
               "atlas": images.new_empty((n_blocks, n_batch, n_classes)),
               "moments": images.new_empty((n_blocks, 3, n_batch, n_images, n_classes, n_sub))}
    # work buffers reused by every block: fresh large tensors per block cost page faults
    buffers = [images.new_empty(tuple(params.means.shape) + (min(block, n_voxels),)) for _ in range(3)]
    everywhere = bool(coverage.all())  # one check per pass spares two products per block
    for j, start in enumerate(range(0, n_voxels, block)):
        n = min(block, n_voxels - start)
        d, log_dens, product = (b[..., :n] for b in buffers)  # [B, N, K, Cmax, n]
        counted = None if everywhere else coverage[:, :, None, start:start + n].to(dtype)  # M_i(x), [B, N, 1, n]
        torch.sub(images[:, :, None, None, start:start + n], mu, out=d)
        torch.mul(d, neg_half_precision, out=log_dens).mul_(d).add_(offset)  # log τ N(x; μ, σ²)
        if n_sub == 1:
            per_tissue, within, subtype_total = log_dens[..., 0, :], None, None
        else:  # the subtypes' log-sum-exp; exp(log_dens − peak) kept, its normalisation folded into w below
            peak = _fold(log_dens, 3, torch.maximum)
            within = log_dens.sub_(peak.unsqueeze(3)).exp_()  # ∝ P(c | k, x)
            subtype_total = _fold(within, 3, torch.add)
            per_tissue = torch.log(subtype_total).add_(peak)  # log p(I_i(x) | k), [B, N, K, n]
        # Σ_i M_i(x) log p(I_i(x) | k), [B, K, n]
        joint = _fold(per_tissue if everywhere else per_tissue.mul_(counted), 1, torch.add)
        if log_atlas is None:
            joint = joint.add_(log_pi)
        else:
            prior = log_pi + log_atlas[..., start:start + n]
            prior = prior.sub_(_fold(prior, 1, torch.maximum).unsqueeze(1))
            mix = prior.exp()  # π_k A_kx up to a factor per voxel
            total = _fold(mix, 1, torch.add).unsqueeze(1)
            torch.sum(mix.div_(total), -1, out=partial["atlas"][j])  # Σ_x π_kx (÷ π_k at the end)
            joint = joint.add_(prior.sub_(total.log_()).to(dtype))  # + log π_kx
        evidence, posterior = _softmax_parts(joint, dim=1)  # [B, n], [B, K, n]
        torch.sum(evidence, -1, out=partial["log_likelihood"][j])
        torch.sum(posterior, -1, out=partial["counts"][j])
        if within is None:  # P_ikcx = M_i(x) P_kx
            w = (posterior.unsqueeze(1).expand(per_tissue.shape) if everywhere else posterior.unsqueeze(1) * counted)
            w = w.unsqueeze(3)
        else:  # P_ikcx = M_i(x) P_kx P(c | k, x)
            share = posterior.unsqueeze(1) / subtype_total  # [B, N, K, n]
            w = within.mul_((share if everywhere else share.mul_(counted)).unsqueeze(3))
        wd = torch.mul(w, d, out=product)
        moments = partial["moments"][j]
        torch.sum(w, -1, out=moments[0])
        torch.sum(wd, -1, out=moments[1])
        torch.sum(wd.mul_(d), -1, out=moments[2])
    log_likelihood = partial["log_likelihood"].double().sum(0)
    counts = partial["counts"].double().sum(0)
    atlas_mass = None
    if log_atlas is not None:  # Σ_x π_kx / π_k = Σ_x A_kx / Σ_j π_j A_jx
        atlas_mass = partial["atlas"].double().sum(0) / params.log_proportions.double().exp()
    # raw moments about 0 from the centred ones, [3, B, N, K, Cmax] (float64: cancellation costs nothing)
    s0, s1, s2 = partial["moments"].double().sum(0)
    mu64 = params.means.to(dtype).double()
    stats = torch.stack([s0, s1 + mu64 * s0, s2 + 2 * mu64 * s1 + mu64 ** 2 * s0])
    return EmPass(log_likelihood, stats, counts, atlas_mass)
