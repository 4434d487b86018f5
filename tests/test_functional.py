"""The functional core: one batched, differentiable likelihood for EM, registration and networks."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import random_mixture
from mvmm.data.atlas import Atlas
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.mixture import ConvergenceWarning, MultivariateMixture
from mvmm.mixture import functional as F
from mvmm.mixture.params import MixtureParams
from mvmm.spatial.transforms import RigidTransform


def fitted_case(shape, seed):
    """Images with hetero-coverage, an atlas prior, and a model fitted to them."""
    images, _, prior = random_mixture(shape=shape, seed=seed)
    coverage = torch.ones(images.shape, dtype=torch.bool)
    coverage[1, ..., : shape[-1] // 3] = False  # image 1 does not cover the first third
    coverage[0, ..., -2:] = False  # image 0 not the last two columns
    counts = np.array([[2, 1, 1], [1, 2, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MultivariateMixture(n_subtypes=counts, max_iter=5, tol=1e-12).fit(images, coverage, prior)
    return images, coverage, prior, model


@pytest.mark.parametrize("shape", [(24, 30), (6, 16, 18)], ids=["2d", "3d"])
def test_batched_nll_equals_single_subjects_and_the_estimator(shape):
    cases = [fitted_case(shape, seed) for seed in (0, 1, 2)]
    images = torch.stack([torch.where(c[1], c[0], torch.zeros_like(c[0])) for c in cases])  # [B, N, *S]
    coverage = torch.stack([c[1] for c in cases])
    log_atlas = torch.stack([c[2].log() for c in cases])
    params = MixtureParams.stack([c[3].params_ for c in cases])
    assert params.means.shape[:3] == (3, 2, 3)

    batched = F.negative_log_likelihood(images, coverage, params, log_atlas)
    assert batched.shape == (3,)
    singles = torch.cat([F.negative_log_likelihood(images[b:b + 1], coverage[b:b + 1], params.subject(b),
                                                   log_atlas[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, singles)
    for b, (im, cov, prior, model) in enumerate(cases):
        assert -float(batched[b]) == pytest.approx(model.score(im, cov, prior), rel=1e-5)
        assert -float(batched[b]) == pytest.approx(float(model.log_likelihood(im, cov, prior)), rel=1e-6)
        # explicit parameters give the same value as the fitted ones
        assert float(model.log_likelihood(im, cov, prior, params=model.params_)) == pytest.approx(-float(batched[b]))
    # the per-voxel log-evidence sums back to the NLL; posteriors are normalised
    joint = F.log_joint(images, coverage, params, log_atlas)
    evidence = F.log_evidence(joint)
    mask = coverage.any(1)
    torch.testing.assert_close(-(evidence * mask).flatten(1).sum(1) / mask.flatten(1).sum(1), batched)
    torch.testing.assert_close(F.log_posteriors(joint).exp().sum(1), torch.ones_like(evidence))


def test_batched_m_step_equals_single_subject_m_steps():
    cases = [fitted_case((20, 20), seed) for seed in (3, 4)]
    images = torch.stack([torch.where(c[1], c[0], torch.zeros_like(c[0])) for c in cases]).flatten(2)
    coverage = torch.stack([c[1] for c in cases]).flatten(2)
    log_atlas = torch.stack([c[2].log() for c in cases]).flatten(2)
    params = MixtureParams.stack([c[3].params_ for c in cases])
    floors = torch.full((2, 2), 1e-3, dtype=torch.float64)
    log_lik, within = F.tissue_log_likelihood(images, coverage, params, keep_within=True)
    post = F.log_posteriors(F.log_prior(log_atlas, params.log_proportions, 1) + log_lik).exp()
    batched = F.m_step(images, coverage, post, within, params, floors, log_atlas).params
    for b in range(2):
        lik_b, within_b = F.tissue_log_likelihood(images[b:b + 1], coverage[b:b + 1], params.subject(b), True)
        single = F.m_step(images[b:b + 1], coverage[b:b + 1], post[b:b + 1], within_b, params.subject(b),
                          floors[b:b + 1], log_atlas[b:b + 1]).params
        for name in ("means", "variances", "log_weights", "log_proportions"):
            torch.testing.assert_close(getattr(batched, name)[b:b + 1], getattr(single, name))


def test_from_head_gives_valid_parameters_with_the_variance_floor():
    counts = np.array([[2, 1, 3]])
    raw = torch.randn(4, 1, 3, 3) * 10
    params = MixtureParams.from_head(raw, raw - 20, raw, torch.randn(4, 3), counts, var_floor=0.5)
    mask = params.subtype_mask
    assert bool((params.variances >= 0.5).all())
    torch.testing.assert_close(params.weights.sum(-1), torch.ones(4, 1, 3))
    assert bool(torch.isinf(params.log_weights[:, ~mask]).all())
    assert params.log_weights[:, 0, 1, 0].abs().max() == 0  # one subtype: weight exactly 1
    torch.testing.assert_close(params.proportions.sum(-1), torch.ones(4))


class TinyHead(nn.Module):
    """Appearance, a log-prior correction and a rigid atlas transform, all learnable."""

    def __init__(self, counts, prior_shape):
        super().__init__()
        n, k = counts.shape
        c = int(counts.max())
        # subtypes start apart (at equal means the weights' gradient is zero by symmetry)
        means = torch.linspace(0, 1, k).reshape(1, 1, k, 1) + 0.1 * torch.arange(c).reshape(1, 1, 1, c)
        self.means = nn.Parameter(means + torch.zeros(1, n, k, c))
        self.variance_logits = nn.Parameter(torch.zeros(1, n, k, c))
        self.weight_logits = nn.Parameter(torch.zeros(1, n, k, c))
        self.atlas_logits = nn.Parameter(torch.zeros((1,) + tuple(prior_shape)))
        self.rigid = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.counts = counts

    def appearance(self):
        return MixtureParams.from_head(self.means, self.variance_logits, self.weight_logits, None, self.counts,
                                       var_floor=1e-3)


def test_gradients_reach_every_head_and_a_few_steps_lower_the_loss():
    phantom = make_phantom(0, ndim=2)
    lge = phantom.images["LGE"]
    atlas = Atlas.builtin_cardiac(lge.grid)
    counts = np.array([[2, 1, 1, 1]])
    head = TinyHead(counts, (4,) + lge.grid.shape)
    subject = Subject([lge], atlas)
    subject.transforms["atlas"] = RigidTransform(2, params=lambda: head.rigid, center=lge.grid.center_world())
    scale = float(lge.data.abs().max())

    def loss():
        case = subject.sample(check=False)
        images = (case.images / scale).unsqueeze(0)  # [1, 1, H, W] in about 0..1
        log_atlas = torch.log(case.prior.clamp_min(1e-6)).unsqueeze(0) + head.atlas_logits
        return F.negative_log_likelihood(images, case.coverage.unsqueeze(0), head.appearance(), log_atlas)[0]

    first = loss()
    first.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    values = []
    for _ in range(15):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert values[-1] < values[0] - 0.1, values


def test_fit_builds_no_graph_and_leaves_the_settings_alone():
    images, _, prior = random_mixture(shape=(20, 20))
    prior = prior.clone().requires_grad_(True)
    model = MultivariateMixture(max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(images, prior=prior, max_iter=2)
        assert model.max_iter == 50 and model.n_iter_ == 2
        assert not model.params_.means.requires_grad
        start = model.params_
        model.fit(images, prior=prior, max_iter=1, init_params=start)
    assert model.lower_bounds_[0] == pytest.approx(model.score(images, prior=prior.detach()), rel=0.05)
    with pytest.raises(ValueError, match="init_params"):
        model.fit(images[:1], prior=prior, init_params=start)


def test_log_likelihood_refuses_a_batch_it_would_misread():
    images, _, prior = random_mixture(shape=(20, 20))
    model = MultivariateMixture(max_iter=3, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(images, prior=prior)
    with pytest.raises(ValueError, match="images"):  # [B, N, *S] with B = 3 is not N = 2 images
        model.log_likelihood(images.unsqueeze(0).expand(3, -1, -1, -1), prior=prior)


def test_log_likelihood_from_a_cached_tissue_term_equals_the_full_one_and_its_prior_gradient():
    """The joint solver's atlas steps reuse log p(I|k) while only the prior moves."""
    images, coverage, prior, model = fitted_case((6, 16, 18), seed=3)
    prior = prior.clone().requires_grad_(True)
    full = model.log_likelihood(images, coverage, prior)
    cached = model.log_likelihood(images, coverage, prior, tissue_log_lik=model.tissue_log_likelihood(images, coverage))
    torch.testing.assert_close(cached, full)
    (g_full,) = torch.autograd.grad(full, prior)
    (g_cached,) = torch.autograd.grad(cached, prior)
    torch.testing.assert_close(g_cached, g_full)
    assert float(g_full.abs().sum()) > 0
