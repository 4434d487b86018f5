"""The registered atlas's vote (``prior_votes``, the cardiac preset's): the written posterior, on the common
grid and on every image's own grid, is the mean of the fitted model's and the prior there; in an ensemble
the atlas is one more voter."""

import dataclasses

import numpy as np
import pytest
import torch

from mvmm.amortized import ensemble
from mvmm.core.errors import InputError
from mvmm.data.atlas import Atlas
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.segment import segment_subject


def phantom_case(atlas=True):
    phantom = make_phantom(seed=3, ndim=2)
    lge, c0 = phantom.images["LGE"], phantom.images["C0"]
    # another phantom's labels: a prior that disagrees with this case here and there
    other = make_phantom(seed=8, ndim=2).truth["LGE"].data[0].round().numpy().astype(np.int64)
    prior = Atlas.from_label_maps([other], lge.grid, sigma_mm=3.0) if atlas else None
    return Subject([lge, c0], atlas=prior)


def test_the_atlas_votes_on_every_grid_and_counts_once_in_an_ensemble():
    subject = phantom_case()
    assert not subject.images[1].grid.same_geometry(subject.images[0].grid)  # C0 has a grid of its own
    plain = segment_subject(subject, device="cpu", registration=None, seed=0)
    voted = segment_subject(subject, device="cpu", registration=None, seed=0, prior_votes=True)
    prior = plain.common.prior
    assert (plain.posterior - prior).abs().max() > 0.5  # the model and the atlas disagree somewhere
    # the vote changes what is written, not the fit
    assert torch.allclose(voted.model.params_.means, plain.model.params_.means)
    assert torch.allclose(voted.posterior, (plain.posterior + prior) / 2, atol=1e-6)
    c0_prior = plain.sample_on("C0").prior
    assert torch.allclose(voted.native_posterior("C0"), (plain.native_posterior("C0") + c0_prior) / 2, atol=1e-6)
    assert (voted.votes, plain.votes) == (2, 1) and voted.report()["settings"]["prior_votes"] is True
    # an ensemble of a voting fit and another: model, atlas and the other count once each
    both = ensemble([voted, plain])
    assert both.votes == 3
    assert torch.allclose(both.posterior, (2 * plain.posterior + prior) / 3, atol=1e-6)
    assert torch.allclose(both.native_posterior("C0"), (2 * plain.native_posterior("C0") + c0_prior) / 3, atol=1e-6)
    # the maps follow: where the voters split two to one, the two win
    expected = plain.label_map(posterior=(2 * plain.posterior + prior) / 3)
    assert np.array_equal(both.label_map(), expected)


def test_the_vote_needs_an_atlas():
    with pytest.raises(InputError, match="^prior_votes: .*needs an atlas"):
        segment_subject(phantom_case(atlas=False), device="cpu", registration=None, prior_votes=True)


def test_a_weighted_prior_outvotes_the_model_on_the_common_grid_only():
    # a fit-guided refit's prior weight (FitGuidedSettings.prior_weight) is for the reference image its atlases were
    # fused by: on another image's own grid (another breath-hold) that prior votes once, as any atlas
    voted = segment_subject(phantom_case(), device="cpu", registration=None, seed=0, prior_votes=True)
    weighted = dataclasses.replace(voted, prior_weight=3.0)
    model, prior = 2 * voted.posterior - voted.common.prior, voted.common.prior
    assert torch.allclose(weighted.voted(model, prior), (model + 3 * prior) / 4, atol=1e-6)
    assert not torch.allclose(weighted.voted(model, prior), voted.posterior, atol=1e-3)
    assert torch.allclose(weighted.native_posterior("C0"), voted.native_posterior("C0"), atol=1e-6)
