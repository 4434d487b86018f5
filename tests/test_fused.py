"""EM's blocked pass (mvmm.mixture.fused) against the functional core it stands in for."""

import numpy as np
import pytest
import torch

from conftest import random_mixture
from mvmm.mixture import functional as F
from mvmm.mixture.fused import em_pass
from mvmm.mixture.params import MixtureParams


def random_params(counts, n_classes, rng, offset=0.0):
    """Parameters with unequal subtype counts (padding), means far from 0 (offset) to expose cancellation."""
    params = MixtureParams.empty(counts)
    weights = torch.zeros_like(params.means)
    for i in range(counts.shape[0]):
        for k in range(n_classes):
            c = counts[i, k]
            params.means[0, i, k, :c] = torch.as_tensor(offset + rng.normal(size=c) * 2)
            params.variances[0, i, k, :c] = torch.as_tensor(rng.uniform(0.3, 2.0, size=c))
            weights[0, i, k, :c] = torch.as_tensor(rng.dirichlet(np.ones(c)))
    params.log_weights = torch.where(params.subtype_mask, weights.log(), params.log_weights)
    params.log_proportions = torch.as_tensor(np.log(rng.dirichlet(np.ones(n_classes))))[None]
    return params


@pytest.mark.parametrize("use_atlas", [True, False], ids=["atlas", "plain"])
@pytest.mark.parametrize("counts", [[[2, 1, 3], [1, 2, 1]], [[1, 1, 1], [1, 1, 1]]], ids=["subtypes", "single"])
@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["centred", "far-from-0"])
@pytest.mark.parametrize("hetero", [True, False], ids=["hetero-coverage", "full-coverage"])
def test_blocked_pass_equals_the_functional_e_and_m_step(use_atlas, counts, offset, hetero):
    rng = np.random.default_rng(3)
    counts = np.array(counts)
    images, _, prior = random_mixture(shape=(37, 41), seed=2)
    images = images + offset
    coverage = torch.ones(images.shape, dtype=torch.bool)
    coverage[1, :, :12] = not hetero  # image 1 misses the first 12 columns, or not
    x = torch.where(coverage, images, torch.zeros_like(images)).reshape(1, 2, -1)
    m = coverage.reshape(1, 2, -1)
    log_atlas = prior.clamp_min(1e-12).log().reshape(1, 3, -1) if use_atlas else None
    params = random_params(counts, 3, rng, offset)

    out = em_pass(x, m, params, log_atlas, block=256)  # many blocks, the last one partial
    log_lik, within = F.tissue_log_likelihood(x, m, params, keep_within=True)
    joint = F.log_prior(log_atlas, params.log_proportions, 1).to(log_lik.dtype) + log_lik
    posteriors = F.log_posteriors(joint).exp()
    torch.testing.assert_close(out.log_likelihood, F.log_evidence(joint).double().sum(-1), rtol=1e-6, atol=0)
    ref = F.subtype_statistics(x, m, posteriors, within)
    mask = params.subtype_mask
    torch.testing.assert_close(out.stats[:, 0][:, mask], ref[:, 0][:, mask], rtol=2e-5, atol=1e-3)
    counts_ref, atlas_ref = F.proportion_statistics(posteriors, params.log_proportions, log_atlas)
    torch.testing.assert_close(out.counts, counts_ref, rtol=1e-5, atol=1e-3)
    if use_atlas:
        torch.testing.assert_close(out.atlas_mass, atlas_ref, rtol=1e-5, atol=1e-3)
    else:
        assert out.atlas_mass is None
    # what matters downstream: the M-step's parameters agree, variances included (far from 0 too)
    floors = torch.full((1, 2), 1e-6, dtype=torch.float64)
    fused = F.params_from_statistics(out.stats, params, floors, params.log_proportions).params
    full = F.m_step(x, m, posteriors, within, params, floors, log_atlas, learn_proportions=False).params
    torch.testing.assert_close(fused.means[:, mask], full.means[:, mask], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(fused.variances[:, mask], full.variances[:, mask], rtol=1e-3, atol=0)
    torch.testing.assert_close(fused.log_weights[:, mask], full.log_weights[:, mask], rtol=0, atol=1e-5)


def test_block_size_does_not_change_the_sums():
    images, _, prior = random_mixture(shape=(6, 16, 18), seed=4)
    x, m = images.reshape(1, 2, -1), torch.ones((1, 2, images[0].numel()), dtype=torch.bool)
    params = random_params(np.array([[2, 1, 2], [2, 2, 1]]), 3, np.random.default_rng(0))
    log_atlas = prior.log().reshape(1, 3, -1)
    one = em_pass(x, m, params, log_atlas, block=x.shape[-1])
    many = em_pass(x, m, params, log_atlas, block=100)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
