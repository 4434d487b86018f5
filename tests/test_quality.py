"""A fit's posterior shift (how far the images moved the posterior from the registered atlas) and the warning a
cardiac fit gets when it is too small: on MS-CMRSeg's LGE alone such fits had lost the heart."""

import logging
from dataclasses import replace

import pytest
import torch

from mvmm.core.settings import CARDIAC_MIN_POSTERIOR_SHIFT
from mvmm.data.atlas import Atlas
from mvmm.data.labels import LabelSet
from mvmm.data.phantom import make_phantom
from mvmm.data.subject import Subject
from mvmm.segment import segment_subject


def lge_case(noise=False):
    lge = make_phantom(seed=3, ndim=2).images["LGE"]
    if noise:  # intensities that say nothing about the anatomy: the same spread, no structure
        g = torch.Generator().manual_seed(0)
        lge = replace(lge, data=torch.randn(lge.data.shape, generator=g) * lge.data.std() + lge.data.mean())
    return lge, Atlas.builtin_cardiac(lge.grid)


@pytest.mark.parametrize("prior_votes", [False, True])
def test_posterior_shift_is_the_models_departure_from_the_atlas_over_its_heart(prior_votes, caplog):
    lge, atlas = lge_case()
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        result = segment_subject(Subject([lge], atlas=atlas), device="cpu", seed=0, prior_votes=prior_votes)
    common = result.common
    model = result.model.predict_proba(common.images, common.coverage, common.prior, common.grid.spacing)
    heart = ((1 - common.prior[0]) > 0.5) & common.coverage.any(0)
    expected = float(0.5 * (model - common.prior).abs().sum(0)[heart].mean())
    assert result.posterior_shift() == pytest.approx(expected, rel=1e-5)  # the model's, whether the atlas votes or not
    quality = result.report()["quality"]
    assert quality == {"posterior_shift": result.posterior_shift(), "min_posterior_shift": CARDIAC_MIN_POSTERIOR_SHIFT,
                       "low": False}
    assert result.posterior_shift() > 2 * CARDIAC_MIN_POSTERIOR_SHIFT  # the phantom's heart is found, clearly
    assert "moved the posterior little" not in caplog.text


def test_a_cardiac_fit_whose_images_say_nothing_is_warned_about(caplog):
    lge, atlas = lge_case(noise=True)
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        result = segment_subject(Subject([lge], atlas=atlas), device="cpu", seed=0, prior_votes=True)
    assert result.posterior_shift() < CARDIAC_MIN_POSTERIOR_SHIFT and result.report()["quality"]["low"]
    assert "moved the posterior little from the registered atlas" in caplog.text
    # the floor was measured on cardiac fits: another anatomy's atlas is reported, not judged
    other = Atlas(atlas.probabilities, atlas.grid, LabelSet(("bg", "A", "B", "C"), (0, 1, 2, 3)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        plain = segment_subject(Subject([lge], atlas=other), device="cpu", seed=0)
    assert plain.report()["quality"] == {"posterior_shift": plain.posterior_shift(), "min_posterior_shift": None,
                                         "low": False}
    assert "moved the posterior little" not in caplog.text
    # and a plain mixture has no atlas to have moved from
    assert segment_subject(Subject([lge]), device="cpu", seed=0, registration=None).posterior_shift() is None


def test_a_low_fit_from_a_searched_start_is_fitted_again_from_the_unsearched_one(monkeypatch, caplog):
    """The retry keeps the fit whose posterior moved further and records both; the warning is the kept one's."""
    import mvmm.segment as segment
    from mvmm.joint import RegistrationSettings

    lge, atlas = lge_case()
    noise, _ = lge_case(noise=True)
    once = segment._segment_once
    starts = []

    def searched_start_sees_noise(subject, registration, **options):
        # the searched start lands "on the wrong anatomy" (noise); the unsearched one on the heart
        starts.append(registration.atlas_search_mm)
        image = noise if registration.atlas_search_mm > 0 else lge
        return once(Subject([image], atlas=subject.atlas), registration=registration, **options)

    monkeypatch.setattr(segment, "_segment_once", searched_start_sees_noise)
    searched = RegistrationSettings(atlas="rigid", atlas_search_mm=5.0)
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        result = segment_subject(Subject([lge], atlas=atlas), device="cpu", seed=0, registration=searched)
    assert starts == [5.0, 0.0]
    retry = result.settings["retry"]
    assert retry["kept"] == "unsearched start" and result.settings["registration"]["atlas_search_mm"] == 0.0
    assert retry["posterior_shift"]["searched start"] < CARDIAC_MIN_POSTERIOR_SHIFT
    assert result.posterior_shift() == retry["posterior_shift"]["unsearched start"] > CARDIAC_MIN_POSTERIOR_SHIFT
    assert result.timings["retry_s"] > 0 and "moved the posterior little" not in caplog.text
    # without a search there is nothing to retry from: one fit, and its warning
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        plain = segment_subject(Subject([noise], atlas=atlas), device="cpu", seed=0,
                                registration=RegistrationSettings(atlas="rigid"))
    assert "retry" not in plain.settings and "moved the posterior little" in caplog.text
    # nor when a template placed the atlas (the search did not run): the same fit again would be wasted
    brightness = torch.linspace(0.2, 1.0, atlas.probabilities.shape[0]).reshape(-1, 1, 1)
    templated = replace(atlas, templates={"LGE": (brightness * atlas.probabilities).sum(0)})  # a mean image of it
    monkeypatch.setattr(segment, "_segment_once", searched_start_sees_noise)
    starts.clear()
    placed = segment_subject(Subject([lge], atlas=templated), device="cpu", seed=0,
                             registration=replace(searched, template_metric="ncc", template_transform="rigid"))
    assert starts == [5.0] and "retry" not in placed.settings and placed.settings["registration"]["atlas_search_mm"] == 5.0
