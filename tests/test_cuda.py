"""The same code on CUDA: runs only where a GPU is present (CI has none and skips it)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.data import Atlas, Subject
from mvmm.mixture import ConvergenceWarning, MultivariateMixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_fit_on_cuda_matches_cpu(phantom3d):
    images = [phantom3d.images[n] for n in ("LGE", "C0", "T2")]
    subject = Subject(images, atlas=Atlas.builtin_cardiac(images[0].grid))
    results = {}
    for device in ("cpu", "cuda"):
        case = subject.sample(device=device)
        assert case.images.device.type == device and case.prior.device.type == device
        model = MultivariateMixture(n_subtypes=2, max_iter=30, tol=1e-12)
        with pytest.warns(ConvergenceWarning):
            model.fit(case.images, case.coverage, case.prior)
        results[device] = (model, model.predict(case.images, case.coverage, case.prior).cpu())
    np.testing.assert_allclose(results["cuda"][0].means_, results["cpu"][0].means_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(results["cuda"][0].lower_bounds_, results["cpu"][0].lower_bounds_, rtol=1e-4)
    assert (results["cuda"][1] == results["cpu"][1]).float().mean() > 0.999


def test_cli_segment_on_cuda(phantom_files, tmp_path):
    result = CliRunner().invoke(main, ["segment", "--images", str(phantom_files["LGE"]), str(phantom_files["C0"]),
                                       "--out", str(tmp_path / "s"), "--device", "cuda", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "report.json").read_text())["device"].startswith("cuda")


def test_joint_registration_on_cuda_matches_cpu():
    from mvmm.joint import RegistrationSettings
    from mvmm.segment import segment_subject
    from test_joint import errors, misaligned_case, misplaced_builtin_atlas

    images, truth, heart = misaligned_case(0, angle_deg=8.0, shift_mm=(7.0, -5.0))
    subject = Subject(images.images, misplaced_builtin_atlas(images.images[0].grid, (6.0, -4.0)))
    settings = RegistrationSettings(atlas="ffd", images="rigid")
    found = {}
    for device in ("cpu", "cuda"):
        result = segment_subject(subject, registration=settings, device=device)
        assert result.posterior.device.type == device
        found[device] = result
    assert errors(found["cuda"].registration.transforms["C0"], truth, heart)[0] < 1.0
    c0_cpu, c0_cuda = (found[d].registration.transforms["C0"] for d in ("cpu", "cuda"))
    assert errors(c0_cuda, c0_cpu, heart)[0] < 0.2  # the same answer up to float rounding
    atlas_cpu, atlas_cuda = (found[d].registration.transforms["atlas"] for d in ("cpu", "cuda"))
    moved = [t(heart.float().to(d)).cpu() for t, d in ((atlas_cpu, "cpu"), (atlas_cuda, "cuda"))]
    assert (moved[0] - moved[1]).norm(dim=-1).mean() < 0.5
    agree = (found["cuda"].label_map() == found["cpu"].label_map()).mean()
    assert agree > 0.99, agree


def test_pairwise_and_groupwise_registration_on_cuda(tmp_path):
    from mvmm.atlas_build import GroupwiseSettings, build_atlas
    from mvmm.register import PairwiseRegistration, PairwiseSettings
    from test_atlas_build import varied_maps
    from test_joint import errors, misaligned_case

    subject, truth, heart = misaligned_case(0, angle_deg=8.0, shift_mm=(7.0, -5.0))
    lge, c0 = subject.images
    settings = PairwiseSettings(transform="rigid", metric="mi", init="header")
    result = PairwiseRegistration(lge, c0, settings, device="cuda").run()
    assert errors(result.transform, truth, heart)[0] < 1.0
    paths = varied_maps(tmp_path)
    atlases = {d: build_atlas(paths, GroupwiseSettings(register="ffd", sigma_mm=0.0), device=d)[0]
               for d in ("cpu", "cuda")}
    assert atlases["cuda"].probabilities.device.type == "cpu"  # saved and placed from host memory
    difference = (atlases["cuda"].probabilities - atlases["cpu"].probabilities).abs().mean()
    assert difference < 0.01, difference


def test_bayes_network_trains_and_segments_on_cuda(tmp_path):
    """The Bayesian CNN on CUDA: a short training run and a prediction that agrees with the CPU's."""
    from mvmm.atlas_build import GroupwiseSettings, build_atlas
    from mvmm.core.settings import BayesNetSettings, TrainingSettings
    from mvmm.data.image import Image
    from mvmm.data.phantom import write_phantom
    from mvmm.nets.data import SubjectRow
    from mvmm.nets.model_dir import load_model
    from mvmm.amortized import segment_with_model
    from mvmm.training import train_bayes

    cases = {s: write_phantom(tmp_path / f"s{s}", seed=s, ndim=2) for s in range(40, 44)}
    atlas, _ = build_atlas([cases[s]["LGE_truth"] for s in cases], GroupwiseSettings(register="none", frame="axes"))
    atlas.save(tmp_path / "atlas.nii.gz")
    rows = [SubjectRow(f"s{s}", {"LGE": cases[s]["LGE"], "C0": cases[s]["C0"]}) for s in (40, 41, 42)]
    settings = BayesNetSettings(grid_size=(48, 48), grid_spacing=(3.0, 3.0), channels=(8, 16, 32), features=8)
    train_bayes(rows, ["LGE", "C0"], [tmp_path / "atlas.nii.gz"], tmp_path / "m", settings,
                TrainingSettings(epochs=3), device="cuda", progress=False)
    images = [Image.read(cases[43][s], s) for s in ("LGE", "C0")]
    on = {d: segment_with_model(images, load_model(tmp_path / "m", d), device=d) for d in ("cpu", "cuda")}
    assert on["cuda"].posterior.device.type == "cuda"
    assert (on["cuda"].posterior.argmax(0).cpu() == on["cpu"].posterior.argmax(0)).float().mean() > 0.99


def test_acwe_and_vae_seg_train_and_segment_on_cuda(tmp_path):
    """The Chan–Vese CNN and the prior-VAE network on CUDA: short runs, predictions that agree with the CPU's."""
    from mvmm.amortized import segment_with_model
    from mvmm.core.settings import AcweNetSettings, PriorVaeSettings, TrainingSettings, VaeSegSettings
    from mvmm.data.image import Image
    from mvmm.data.phantom import write_phantom
    from mvmm.nets.data import SubjectRow
    from mvmm.nets.model_dir import load_model
    from mvmm.training import train_acwe, train_prior, train_vae_seg

    cases = {s: write_phantom(tmp_path / f"s{s}", seed=s, ndim=2) for s in range(50, 54)}
    rows = [SubjectRow(f"s{s}", {"LGE": cases[s]["LGE"], "C0": cases[s]["C0"]}) for s in (50, 51, 52)]
    grid = dict(grid_size=(32, 32), grid_spacing=(4.0, 4.0), channels=(8, 16, 32))
    train_acwe(rows, ["LGE", "C0"], tmp_path / "acwe", AcweNetSettings(**grid), TrainingSettings(epochs=2),
               device="cuda", progress=False)
    train_prior([cases[s]["LGE_truth"] for s in cases], "Myo=200,LV=500,RV=600", tmp_path / "prior",
                PriorVaeSettings(**grid, latent=4), TrainingSettings(epochs=2), device="cuda", progress=False)
    train_vae_seg(rows, ["LGE", "C0"], tmp_path / "prior", tmp_path / "vae", VaeSegSettings(channels=(8, 16, 32)),
                  TrainingSettings(epochs=2), device="cuda", progress=False)
    images = [Image.read(cases[53][s], s) for s in ("LGE", "C0")]
    for name, options in (("acwe", {}), ("vae", {"samples": 3})):
        on = {d: segment_with_model(images, load_model(tmp_path / name, d), device=d, **options) for d in ("cpu", "cuda")}
        assert on["cuda"].posterior.device.type == "cuda"
        assert (on["cuda"].posterior.argmax(0).cpu() == on["cpu"].posterior.argmax(0)).float().mean() > 0.98


def test_an_uncropped_case_on_cuda_finds_the_heart_as_on_cpu():
    from test_template_search import HEART_SHIFT, atlas_with_template, uncropped_case  # noqa: F401 (fixture's body)

    from mvmm.core.settings import RegistrationSettings
    from mvmm.segment import segment_subject

    atlas = atlas_with_template.__wrapped__()
    case, _ = uncropped_case(np.random.default_rng(3))
    settings = RegistrationSettings(atlas="affine", template_metric="none", atlas_search_fov=True,
                                    atlas_search_mm=5.0, max_outer=4, affine_weight=0.3)
    found = {}
    for device in ("cpu", "cuda"):
        result = segment_subject(Subject([case], atlas=atlas, roi_margin_mm=5.0), registration=settings,
                                 max_iter=10, learn_proportions=False, device=device)
        found[device] = (result.registration.fov_search["shift_mm"], result.label_map())
    assert np.allclose(found["cuda"][0], HEART_SHIFT, atol=4.0) and found["cuda"][0] == found["cpu"][0]
    assert (found["cuda"][1] == found["cpu"][1]).mean() > 0.99


def test_a_network_on_an_uncropped_case_on_cuda_as_on_cpu(tmp_path):
    """segment --model's start on a scan much wider than the network grid (template, likelihood search,
    the grid moved with the atlas) gives the same start and labels on CUDA as on the CPU."""
    from test_template_search import NETWORK, _crop_around_heart, atlas_with_template, uncropped_case  # noqa: F401

    from mvmm.amortized import segment_with_model
    from mvmm.core.settings import TrainingSettings
    from mvmm.nets.data import SubjectRow
    from mvmm.training import train_bayes

    case, _ = uncropped_case(np.random.default_rng(6))
    _crop_around_heart(case).write(tmp_path / "crop.nii.gz")
    train_bayes([SubjectRow("crop", {"LGE": tmp_path / "crop.nii.gz"})], ["LGE"], atlas_with_template.__wrapped__(),
                tmp_path / "model", NETWORK, TrainingSettings(epochs=2), device="cpu", progress=False)
    found = {}
    for device in ("cpu", "cuda"):
        result = segment_with_model([case], tmp_path / "model", refine=20, device=device)
        found[device] = (np.asarray(result.registration.fov_search["start_shift_mm"]), result.label_map())
    assert np.allclose(found["cuda"][0], found["cpu"][0], atol=1e-3)
    assert (found["cuda"][1] == found["cpu"][1]).mean() > 0.99
