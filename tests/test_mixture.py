import warnings

import numpy as np
import pytest
import torch

from conftest import random_mixture
from mvmm.core.errors import InputError
from mvmm.mixture import ConvergenceWarning, MultivariateMixture, parse_subtypes
from mvmm.mixture.subtypes import parse_subtype_names
from mvmm.mixture import functional as F
from mvmm.mixture.params import MixtureParams


@pytest.mark.parametrize("shape", [(40, 40), (8, 20, 20)], ids=["2d", "3d"])
@pytest.mark.parametrize("use_prior", [True, False])
def test_log_likelihood_never_decreases(shape, use_prior):
    images, _, prior = random_mixture(shape=shape, means=((0.0, 2.0, 4.0), (1.0, 0.0, 2.0)))
    coverage = torch.ones(images.shape, dtype=torch.bool)
    coverage[1, ..., : shape[-1] // 3] = False  # hetero-coverage
    model = MultivariateMixture(n_subtypes=2, n_classes=3, tol=1e-12, max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(images, coverage, prior if use_prior else None)
    lb = np.asarray(model.lower_bounds_)
    assert len(lb) == 41
    assert np.all(np.diff(lb) >= -1e-6 * np.abs(lb[:-1])), np.diff(lb).min()
    assert lb[-1] > lb[0]


def test_m_step_matches_numpy_reference():
    rng = np.random.default_rng(1)
    n, k, v = 2, 3, 500
    x = rng.normal(size=(n, v)) * 3
    m = rng.random((n, v)) > 0.2
    atlas = rng.dirichlet(np.ones(k), size=v).T
    post = rng.dirichlet(np.ones(k), size=v).T
    counts = np.array([[2, 1, 3], [1, 2, 1]])
    params = MixtureParams.empty(counts)
    weights = torch.zeros_like(params.means)
    for i in range(n):
        for kk in range(k):
            c = counts[i, kk]
            params.means[0, i, kk, :c] = torch.as_tensor(rng.normal(size=c))
            params.variances[0, i, kk, :c] = torch.as_tensor(rng.uniform(0.5, 2, size=c))
            weights[0, i, kk, :c] = torch.as_tensor(rng.dirichlet(np.ones(c)))
    params.log_weights = torch.where(params.subtype_mask, weights.log(), params.log_weights)
    params.log_proportions = torch.as_tensor(np.log(rng.dirichlet(np.ones(k))))[None]
    xt, mt = torch.as_tensor(x)[None], torch.as_tensor(m)[None]
    _, within = F.tissue_log_likelihood(xt, mt, params, keep_within=True)
    post_t = torch.as_tensor(post)[None]  # an arbitrary tissue posterior
    new = F.m_step(xt, mt, post_t, within, params, torch.full((1, n), 1e-12, dtype=torch.float64),
                   torch.as_tensor(np.log(atlas))[None]).params

    for i in range(n):
        for kk in range(k):
            c = counts[i, kk]
            mu, var, tau = (params.means[0, i, kk, :c].numpy(), params.variances[0, i, kk, :c].numpy(),
                            params.weights[0, i, kk, :c].numpy())
            dens = tau[:, None] * np.exp(-0.5 * (x[i] - mu[:, None]) ** 2 / var[:, None]) / np.sqrt(2 * np.pi * var[:, None])
            p_ikc = post[kk] * dens / dens.sum(0) * m[i]  # P_ikcx, only where M_i(x) = 1
            tau_ref = p_ikc.sum(1) / (post[kk] * m[i]).sum()
            mu_ref = (p_ikc * x[i]).sum(1) / p_ikc.sum(1)
            var_ref = (p_ikc * (x[i] - mu_ref[:, None]) ** 2).sum(1) / p_ikc.sum(1)
            np.testing.assert_allclose(new.weights[0, i, kk, :c].numpy(), tau_ref, rtol=1e-5)
            np.testing.assert_allclose(new.means[0, i, kk, :c].numpy(), mu_ref, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(new.variances[0, i, kk, :c].numpy(), var_ref, rtol=1e-5)
    pi = params.proportions[0].numpy()
    pi_ref = post.sum(1) / (atlas / (pi[:, None] * atlas).sum(0)).sum(1)
    np.testing.assert_allclose(new.proportions[0].numpy(), pi_ref / pi_ref.sum(), rtol=1e-6)


def test_posteriors_sum_to_one_and_fall_back_to_prior_without_coverage():
    images, _, prior = random_mixture(shape=(25, 25))
    coverage = torch.ones(images.shape, dtype=torch.bool)
    coverage[:, :5] = False  # no image covers the first five rows
    model = MultivariateMixture().fit(images, coverage, prior)
    post = model.predict_proba(images, coverage, prior)
    assert post.shape == prior.shape
    assert torch.allclose(post.sum(0), torch.ones(25, 25), atol=1e-5)
    pi = torch.as_tensor(model.proportions_, dtype=torch.float32)[:, None, None]
    expected = pi * prior[:, :5] / (pi * prior[:, :5]).sum(0, keepdim=True)
    assert torch.allclose(post[:, :5], expected, atol=1e-5)


def test_known_mixture_is_recovered():
    means = ((-4.0, 0.0, 5.0), (2.0, 8.0, -3.0))
    images, labels, prior = random_mixture(shape=(60, 60), means=means, seed=4)
    model = MultivariateMixture().fit(images, prior=prior)
    np.testing.assert_allclose(model.means_[..., 0], means, atol=0.1)
    np.testing.assert_allclose(model.variances_[..., 0], 1.0, atol=0.1)
    np.testing.assert_allclose(model.proportions_, np.bincount(labels.flatten(), minlength=3) / labels.numel(), atol=0.03)
    assert model.converged_ and (model.predict(images, prior=prior) == labels).float().mean() > 0.99
    # subtypes: tissue 0 of image 0 is a two-Gaussian mixture
    g = torch.Generator().manual_seed(5)
    split = torch.rand(images.shape[1:], generator=g) < 0.3
    images2 = images.clone()
    images2[0][(labels == 0) & split] += 12.0  # 30 % of tissue 0 now sits at 8 ("scar")
    counts = np.array([[2, 1, 1], [1, 1, 1]])
    model2 = MultivariateMixture(n_subtypes=counts).fit(images2, prior=prior)
    np.testing.assert_allclose(np.sort(model2.means_[0, 0]), [-4.0, 8.0], atol=0.15)
    np.testing.assert_allclose(np.sort(model2.weights_[0, 0]), [0.3, 0.7], atol=0.03)


def test_plain_mixture_without_prior_orders_classes_by_first_image():
    images, labels, _ = random_mixture(shape=(40, 40), means=((10.0, 0.0, 5.0), (1.0, 1.0, 8.0)))
    model = MultivariateMixture(n_classes=3, random_state=0).fit(images)
    np.testing.assert_allclose(model.means_[0, :, 0], [0.0, 5.0, 10.0], atol=0.2)
    remap = torch.tensor([2, 0, 1])  # true class -> class ordered by image-0 mean
    assert (model.predict(images) == remap[labels]).float().mean() > 0.99


def test_intensities_outside_an_images_coverage_change_nothing():
    images, _, prior = random_mixture(shape=(30, 30))
    coverage = torch.ones(images.shape, dtype=torch.bool)
    coverage[1, 10:20] = False
    altered = images.clone()
    altered[1, 10:20] = torch.randn(10, 30) * 1000 + 77  # garbage where image 1 does not count
    a = MultivariateMixture(n_subtypes=2).fit(images, coverage, prior)
    b = MultivariateMixture(n_subtypes=2).fit(altered, coverage, prior)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.lower_bounds_ == b.lower_bounds_
    assert torch.equal(a.predict_proba(images, coverage, prior), b.predict_proba(altered, coverage, prior))


def test_mrf_cleans_isolated_errors():
    labels = torch.zeros(48, 48, dtype=torch.long)
    labels[:, 24:] = 1  # two half-planes: a smooth truth
    g = torch.Generator().manual_seed(0)
    images = (labels.float() * 2.0 + torch.randn(48, 48, generator=g) * 0.9).unsqueeze(0)
    plain = MultivariateMixture(n_classes=2, random_state=0).fit(images)
    smooth = MultivariateMixture(n_classes=2, random_state=0, mrf_beta=1.0).fit(images)
    accuracy = [float((m.predict(images) == labels).float().mean()) for m in (plain, smooth)]
    assert accuracy[0] < 0.9 and accuracy[1] > accuracy[0] + 0.05


def test_fitted_model_round_trips_through_dict():
    images, _, prior = random_mixture()
    model = MultivariateMixture(n_subtypes=np.array([[2, 1, 1], [1, 1, 3]])).fit(images, prior=prior)
    back = MultivariateMixture.from_dict(model.to_dict())
    np.testing.assert_array_equal(back.means_, model.means_)
    assert torch.allclose(back.predict_proba(images, prior=prior), model.predict_proba(images, prior=prior))


def test_not_converging_is_a_warning():
    images, _, prior = random_mixture()
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        model = MultivariateMixture(max_iter=2, tol=1e-15).fit(images, prior=prior)
    assert not model.converged_ and model.n_iter_ == 2


def test_parse_subtypes():
    counts = parse_subtypes(["*:bg=2", "LGE:Myo=3"], ["LGE", "C0"], ["bg", "Myo", "LV"])
    np.testing.assert_array_equal(counts, [[2, 3, 1], [2, 1, 1]])
    with pytest.raises(InputError, match="unknown image 'T2'"):
        parse_subtypes(["T2:Myo=2"], ["LGE", "C0"], ["bg", "Myo"])
    with pytest.raises(InputError, match="unknown tissue 'scar'"):
        parse_subtypes(["LGE:scar=2"], ["LGE"], ["bg", "Myo"])
    with pytest.raises(InputError, match="IMAGE:TISSUE=N"):
        parse_subtypes(["LGE=2"], ["LGE"], ["bg", "Myo"])


def test_subtypes_can_be_named_darkest_first():
    specs = ["*:bg=2,LGE:Myo=normal,scar", "T2:Myo=normal,oedema"]
    counts = parse_subtypes(specs, ["LGE", "C0", "T2"], ["bg", "Myo", "LV"])
    np.testing.assert_array_equal(counts, [[2, 2, 1], [2, 1, 1], [2, 2, 1]])
    assert parse_subtype_names(specs, ["LGE", "C0", "T2"], ["bg", "Myo", "LV"]) == {
        "LGE": {"Myo": ["normal", "scar"]}, "T2": {"Myo": ["normal", "oedema"]}}
    # a later count replaces the names
    assert parse_subtype_names(specs + ["T2:Myo=3"], ["LGE", "C0", "T2"], ["bg", "Myo", "LV"]) == {
        "LGE": {"Myo": ["normal", "scar"]}}
    with pytest.raises(InputError, match="subtype names repeat"):
        parse_subtypes(["LGE:Myo=scar,scar"], ["LGE"], ["bg", "Myo"])
    with pytest.raises(InputError, match="must be an integer, or subtype names"):
        parse_subtypes(["LGE:Myo=2x"], ["LGE"], ["bg", "Myo"])
    with pytest.raises(InputError, match="must be at least 1"):
        parse_subtypes(["LGE:Myo=0"], ["LGE"], ["bg", "Myo"])


def test_model_input_errors_name_the_argument():
    images, _, prior = random_mixture()
    with pytest.raises(ValueError, match="prior: expected shape"):
        MultivariateMixture().fit(images, prior=prior[:, :5])
    with pytest.raises(ValueError, match="coverage: no voxel"):
        MultivariateMixture().fit(images, torch.zeros(images.shape, dtype=torch.bool), prior)
    with pytest.raises(ValueError, match="plain mixture .* needs n_classes"):
        MultivariateMixture().fit(images)


def test_proportions_are_learned_or_held_at_the_atlas():
    g = torch.Generator().manual_seed(3)
    shape = (40, 40)
    labels = (torch.rand(shape, generator=g) < 0.3).long()  # tissue 1 covers 30 %, tissue 0 70 %
    images = torch.stack([torch.tensor([0.0, 3.0])[labels] + torch.randn(shape, generator=g)])
    one_hot = torch.nn.functional.one_hot(labels, 2).movedim(-1, 0).float()
    weak = 0.45 + 0.1 * one_hot  # a weak atlas that knows nothing of how much there is of each tissue
    fits = {}
    for learn in (True, False):
        fits[learn] = MultivariateMixture(n_subtypes=1, learn_proportions=learn, random_state=0).fit(images, None, weak)
    assert fits[True].proportions_ == pytest.approx([0.7, 0.3], abs=0.05)
    assert fits[False].proportions_ == pytest.approx([0.5, 0.5], abs=1e-12)
    # the learned proportions maximise the likelihood over a larger family
    assert fits[True].lower_bounds_[-1] >= fits[False].lower_bounds_[-1]
    # round trip keeps the setting; a plain mixture learns them whatever the setting
    assert MultivariateMixture.from_dict(fits[False].to_dict()).learn_proportions is False
    plain = MultivariateMixture(n_subtypes=1, n_classes=2, learn_proportions=False, random_state=0).fit(images)
    assert sorted(plain.proportions_) == pytest.approx([0.3, 0.7], abs=0.05)


def partly_covered_case(seed):
    """Two 12 × 14 images, each covering part of the grid (some voxels by neither), and a random 3-class prior."""
    rng = np.random.default_rng(seed)
    images = torch.as_tensor(rng.normal(0, 1, (2, 12, 14)) + np.linspace(0, 3, 14), dtype=torch.float32)
    coverage = torch.zeros(images.shape, dtype=torch.bool)
    coverage[0, 2:9, 3:12] = True
    coverage[1, 5:11, 1:8] = True
    prior = torch.as_tensor(rng.dirichlet(np.ones(3), (12, 14)).transpose(2, 0, 1), dtype=torch.float32)
    return images, coverage, prior


@pytest.mark.parametrize("with_prior", [True, False])
def test_predict_proba_on_the_counted_voxels_equals_the_whole_grid_e_step(with_prior):
    # predict_proba runs the E-step where an image counts and writes the prior elsewhere: the same as
    # the E-step over every voxel (where nothing counts, the densities drop out)
    images, coverage, prior = partly_covered_case(4)
    prior[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # an exact zero, as atlases hold
    model = MultivariateMixture(n_subtypes=np.array([[2, 1, 1], [1, 1, 2]]), n_classes=3, random_state=0,
                                max_iter=20, tol=1e-12)
    with pytest.warns(ConvergenceWarning):
        model.fit(images, coverage, prior if with_prior else None)
    got = model.predict_proba(images, coverage, prior if with_prior else None)
    data = model._voxels(images, coverage, prior if with_prior else None, None, roi_only=False)
    expected = model._e_step(data, model.params_, keep_within=False).log_post[0].exp().reshape(got.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not coverage.any(0).all()  # the test has voxels where nothing counts


@pytest.mark.parametrize("mrf_beta", [0.0, 0.5])
def test_adopt_predict_proba_is_adopt_then_predict_proba(mrf_beta):
    # one E-step gives the adopted θ's score and its posterior (a network's answer): the same numbers as
    # the two calls, where some voxels are counted by no image and with an MRF (which needs the grid)
    images, coverage, prior = partly_covered_case(5)
    fitted = MultivariateMixture(n_subtypes=np.array([[2, 1, 1], [1, 1, 2]]), n_classes=3, random_state=0, max_iter=5)
    with pytest.warns(ConvergenceWarning):
        fitted.fit(images, coverage, prior)
    two = MultivariateMixture(n_subtypes=fitted.n_subtypes_, mrf_beta=mrf_beta)
    expected = two.adopt(fitted.params_, images, coverage, prior, (1.0, 2.0)).predict_proba(images, coverage, prior,
                                                                                         (1.0, 2.0))
    one = MultivariateMixture(n_subtypes=fitted.n_subtypes_, mrf_beta=mrf_beta)
    got = one.adopt_predict_proba(fitted.params_, images, coverage, prior, (1.0, 2.0))
    torch.testing.assert_close(got, expected)
    assert one.lower_bounds_ == two.lower_bounds_ and one.n_iter_ == 0
    assert not torch.allclose(got, prior)  # the data moved the posterior off the prior
