"""The Bayesian segmentation CNN (mvmm.nets): one likelihood with EM, gradients, training, model
directories, `mvmm train bayes` and `mvmm segment --model`. Tiny networks on 2D phantoms, a few steps."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.atlas_build import GroupwiseSettings, build_atlas
from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.settings import BayesNetSettings, TrainingSettings
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS
from mvmm.data.phantom import make_phantom, write_phantom
from mvmm.metrics import evaluate_labels
from mvmm.mixture.model import ConvergenceWarning, MultivariateMixture
from mvmm.nets.bayes import BayesSegNet, bayes_loss
from mvmm.nets.data import SubjectRow, prepare_case, stack_cases, subjects_from_csv
from mvmm.nets.model_dir import load_model
from mvmm.nets.train import epoch_lr, seeded_network, train_network
from mvmm.amortized import segment_with_model
from mvmm.training import model_subtypes, placed_subject, train_bayes

TINY = BayesNetSettings(grid_size=(48, 48), grid_spacing=(3.0, 3.0), channels=(4, 8, 16), features=4,
                        subtypes=["LGE:Myo=2"])
SEQUENCES = ["LGE", "C0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six 2D phantom cases on disk, a label-only atlas (axes frame) of four others, and a CSV of the six."""
    root = tmp_path_factory.mktemp("cohort")
    cases = {seed: write_phantom(root / f"s{seed}", seed=seed, ndim=2) for seed in range(10, 16)}
    truths = [write_phantom(root / f"a{seed}", seed=seed, ndim=2)["LGE_truth"] for seed in range(20, 24)]
    atlas, _ = build_atlas(truths, GroupwiseSettings(register="none", frame="axes"))
    atlas.save(root / "atlas.nii.gz")
    table = root / "subjects.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "LGE", "C0"])
        for seed, files in cases.items():
            writer.writerow([f"s{seed}", files["LGE"].relative_to(root), files["C0"].relative_to(root)])
    return root, cases, table


def network_cases(cohort, seeds):
    root, cases, _ = cohort
    from mvmm.data.atlas import Atlas

    atlas = Atlas.read([root / "atlas.nii.gz"])
    settings = TINY.resolved(2)
    out = []
    for seed in seeds:
        images = [Image.read(cases[seed][s], s) for s in SEQUENCES]
        out.append(prepare_case(placed_subject(images, atlas), settings))
    return out, atlas, settings


def tiny_net(atlas, settings, seed=0):
    counts = model_subtypes(settings, SEQUENCES, atlas)
    return seeded_network(lambda: BayesSegNet(counts, settings), seed)


def test_training_loss_and_em_score_are_one_likelihood(cohort):
    cases, atlas, settings = network_cases(cohort, [10])
    net = tiny_net(atlas, settings)
    batch = stack_cases(cases)
    batch["region"] = batch["coverage"].any(1)  # EM scores every covered voxel
    with torch.no_grad():
        prediction = net(batch)
        loss = bayes_loss(net, batch, prediction, smoothness=0.0)
    params = prediction.params.subject(0)
    model = MultivariateMixture(n_subtypes=params.n_subtypes)
    em_score = model.adopt(params, batch["images"][0], batch["coverage"][0], prediction.warped_prior[0]).lower_bounds_[0]
    differentiable = model.log_likelihood(batch["images"][0], batch["coverage"][0], prediction.warped_prior[0], params)
    assert float(loss["data"]) == pytest.approx(-em_score, rel=1e-5)
    assert float(loss["data"]) == pytest.approx(-float(differentiable), rel=1e-5)
    # and one EM step from the network's θ cannot lower it (the network's θ is a valid EM start)
    with pytest.warns(ConvergenceWarning):  # three iterations, by design
        model.fit(batch["images"][0], batch["coverage"][0], prediction.warped_prior[0], init_params=params, max_iter=3)
    assert np.all(np.diff(model.lower_bounds_) >= -1e-6)


def test_gradients_reach_every_head(cohort):
    cases, atlas, settings = network_cases(cohort, [10, 11])
    net = tiny_net(atlas, settings)
    batch = stack_cases(cases)
    loss = bayes_loss(net, batch, net(batch), smoothness=1.0)["loss"]
    loss.backward()
    for name, module in (("backbone", net.backbone), ("velocity", net.velocity_head),
                         ("appearance", net.appearance_head)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_network_warp_is_the_warp_segment_applies(cohort):
    """The prior the network warps on its canonical grid is the atlas moved by the world transform
    that segment --model builds (rotated velocity, moved control grid) and samples exactly."""
    root, cases, _ = cohort
    net_cases, atlas, settings = network_cases(cohort, [12])
    net = tiny_net(atlas, settings)
    with torch.no_grad():  # a visible deformation: a large random velocity head
        net.velocity_head.weight.normal_(std=2.0)
        net.velocity_head.bias.copy_(torch.tensor([3.0, -2.0]))
    images = [Image.read(cases[12][s], s) for s in SEQUENCES]
    from mvmm.nets.model_dir import LoadedModel, ModelConfig

    config = ModelConfig("bayes", settings, SEQUENCES, model_subtypes(settings, SEQUENCES, atlas), atlas.labels,
                         TrainingSettings(), [])
    result = segment_with_model(images, LoadedModel(root, config, net.eval(), atlas), device="cpu")
    with torch.no_grad():
        prediction = net(stack_cases(net_cases))
        exact = result.subject.sample(net_cases[0].grid).prior
    moved = float((prediction.warped_prior[0] - net_cases[0].prior).abs().mean())
    error = float((prediction.warped_prior[0] - exact).abs().mean())
    assert moved > 0.02  # the warp does something...
    # ...and both paths agree on it, up to the network path's double interpolation of the atlas (the
    # velocity left in the grid's axes instead of rotated onto the world's would miss by 3x more)
    assert error < 0.1 * moved


def test_a_network_fit_checks_its_posterior_shift_as_an_em_fit_does(cohort, monkeypatch, caplog):
    import logging

    import mvmm.segment

    root, cases, _ = cohort
    _, atlas, settings = network_cases(cohort, [12])
    from mvmm.nets.model_dir import LoadedModel, ModelConfig

    config = ModelConfig("bayes", settings, SEQUENCES, model_subtypes(settings, SEQUENCES, atlas), atlas.labels,
                         TrainingSettings(), [])
    model = LoadedModel(root, config, tiny_net(atlas, settings).eval(), atlas)
    images = [Image.read(cases[12][s], s) for s in SEQUENCES]
    result = segment_with_model(images, model, device="cpu")
    shift = result.report()["quality"]["posterior_shift"]
    assert shift is not None and 0 < shift < 1
    monkeypatch.setattr(mvmm.segment, "CARDIAC_MIN_POSTERIOR_SHIFT", shift + 0.01)  # this fit now falls short
    with caplog.at_level(logging.WARNING, logger="mvmm.segment"):
        low = segment_with_model(images, model, device="cpu")
    assert low.report()["quality"]["low"] and "moved the posterior little" in caplog.text


def test_a_cases_warp_reuses_the_networks_integrated_field(cohort):
    """exp(v) integrated on the canonical grid, rotated into an oblique case's world, is the field a
    fresh integration there gives (exp commutes with the rigid map), and no second integration runs."""
    _, atlas, settings = network_cases(cohort, [12])
    net = tiny_net(atlas, settings)
    velocity = 4.0 * torch.randn((1, 2) + tuple(net.control_grid.shape), generator=torch.Generator().manual_seed(3))
    angle = np.deg2rad(35.0)
    matrix = np.array([[np.cos(angle), -np.sin(angle), 12.0], [np.sin(angle), np.cos(angle), -7.0], [0, 0, 1]])
    case_grid = net.grid.moved(matrix)
    canonical = net.svf(velocity)
    with torch.no_grad():
        fresh = net.world_svf(velocity[0], case_grid).displacement_field()
        reused = net.world_svf(velocity[0], case_grid, canonical.displacement_field()[0])
        reused._exponential = None  # integrating again would fail here
        field = reused.displacement_field()
    assert float(fresh.abs().max()) > 2.0  # a visible deformation
    torch.testing.assert_close(field, fresh, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="field"):
        net.world_svf(velocity[0], case_grid).reuse_displacement_field(fresh[:, 1:])


def test_tiny_training_lowers_the_loss_and_is_reproducible(cohort, tmp_path):
    cases, atlas, settings = network_cases(cohort, [10, 11, 12, 13])
    training = TrainingSettings(epochs=12, batch_size=2, lr=3e-3, seed=3)
    logs, nets = [], []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        net = tiny_net(atlas, settings, seed=training.seed)
        logs.append(train_network(net, cases, training, tmp_path / run, "cpu", progress=False))
        nets.append(net)
    losses = [h["loss"] for h in logs[0]]
    assert np.mean(losses[-3:]) < losses[0] - 0.05
    # same seed, same weights on CPU
    for (name, a), (_, b) in zip(nets[0].state_dict().items(), nets[1].state_dict().items()):
        assert torch.equal(a, b), name


class Interrupted(Exception):
    pass


def interrupt_after(epochs: int):
    """An ``on_epoch`` that stops training after ``epochs`` epochs, as a killed run stops."""
    def on_epoch(history):
        if len(history) == epochs:
            raise Interrupted
    return on_epoch


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_the_loss_curve(cohort, tmp_path, schedule):
    cases, atlas, settings = network_cases(cohort, [10, 11, 12])
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    full = TrainingSettings(epochs=4, batch_size=2, seed=1, lr_schedule=schedule)
    train_network(tiny_net(atlas, settings, 1), cases, full, whole, "cpu", progress=False)
    with pytest.raises(Interrupted):
        train_network(tiny_net(atlas, settings, 1), cases, full, split, "cpu", progress=False,
                      on_epoch=interrupt_after(2))
    resumed = train_network(tiny_net(atlas, settings, 99), cases, full, split, "cpu", resume=True, progress=False)
    reference = json.loads((whole / "log.json").read_text())["epochs"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    assert [h["lr"] for h in resumed] == [h["lr"] for h in reference]
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in reference], rtol=1e-5)


def test_cosine_schedule_anneals_the_learning_rate_to_zero():
    settings = TrainingSettings(epochs=10, lr=2e-3, lr_schedule="cosine")
    rates = [epoch_lr(settings, e) for e in range(1, 11)]
    assert rates[0] == pytest.approx(2e-3) and rates[5] == pytest.approx(1e-3)  # half-way: half the rate
    assert np.all(np.diff(rates) < 0) and 0 < rates[-1] < 1e-4
    assert {epoch_lr(TrainingSettings(epochs=10, lr=2e-3), e) for e in range(1, 11)} == {2e-3}
    with pytest.raises(InputError, match="lr_schedule"):
        TrainingSettings(lr_schedule="step")


def test_train_bayes_model_directory_and_segment(cohort, tmp_path):
    root, cases, table = cohort
    rows = subjects_from_csv(table, SEQUENCES)[:4]
    out = tmp_path / "model"
    result = train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], out, TINY, TrainingSettings(epochs=6, lr=3e-3),
                         device="cpu", progress=False)
    assert result["epochs"] == 6
    for name in ("config.json", "weights.pt", "checkpoint.pt", "atlas.nii.gz", "atlas.json", "log.json", "loss.png"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "mvmm-model/1" and config["images"] == SEQUENCES
    assert config["labels"] == CARDIAC_LABELS.as_dict() and config["network"]["grid_size"] == [48, 48]
    assert config["n_subtypes"][0][CARDIAC_LABELS.names.index("Myo")] == 2
    # a reloaded model predicts bit-identically
    images = [Image.read(cases[15][s], s) for s in SEQUENCES]
    first, second = (segment_with_model(images, load_model(out), device="cpu") for _ in range(2))
    assert torch.equal(first.posterior, second.posterior)
    # refinement: EM from the network's θ never lowers log L
    refined = segment_with_model(images, out, refine=5, device="cpu")
    assert np.all(np.diff(refined.model.lower_bounds_) >= -1e-6)
    assert refined.model.lower_bounds_[0] == pytest.approx(first.model.lower_bounds_[0], rel=1e-6)
    # an existing model directory is not replaced without force
    with pytest.raises(InputError, match="not empty"):
        train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], out, TINY, TrainingSettings(epochs=1), device="cpu",
                    progress=False)
    # a resumed run reports the time of all its epochs, not only this call's
    resumed = train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], out, TINY, TrainingSettings(epochs=8, lr=3e-3),
                          device="cpu", progress=False, resume=True)
    epochs = json.loads((out / "log.json").read_text())["epochs"]
    assert resumed["epochs"] == len(epochs) == 8
    assert resumed["epoch_seconds"] == sum(h["seconds"] for h in epochs) > sum(h["seconds"] for h in epochs[6:])


def test_cli_train_resume_and_segment_with_model(cohort, tmp_path):
    root, cases, table = cohort
    out = tmp_path / "model"
    runner = CliRunner()
    train = ["train", "bayes", "--data", str(table), "--sequences", "LGE", "C0", "--atlas", str(root / "atlas.nii.gz"),
             "--out", str(out), "--subtypes", "LGE:Myo=2", "--lr-schedule", "cosine", "--device", "cpu", "-q"]
    result = runner.invoke(main, train + ["--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "2 epochs" in result.output
    # (the network grid is the default here: 72 x 72 x 2 mm)
    config = json.loads((out / "config.json").read_text())
    assert config["network"]["grid_size"] == [72, 72] and config["training"]["lr_schedule"] == "cosine"
    assert [h["lr"] for h in json.loads((out / "log.json").read_text())["epochs"]] == [1e-3, 0.5e-3]
    result = runner.invoke(main, train + ["--epochs", "2"])
    assert result.exit_code != 0 and "--out" in result.output and "not empty" in result.output
    result = runner.invoke(main, train + ["--epochs", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert [h["epoch"] for h in json.loads((out / "log.json").read_text())["epochs"]] == [1, 2, 3]
    seg = tmp_path / "seg"
    result = runner.invoke(main, ["segment", "--images", str(cases[15]["C0"]), str(cases[15]["LGE"]),
                                  "--model", str(out), "--refine", "3", "--out", str(seg), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((seg / "report.json").read_text())
    assert {"network_s", "refine_s"} <= set(report["timings_s"]) and report["settings"]["refine"] == 3
    # a model of cardiac labels gets the cardiac preset's clean-up, as the experiment's bayes (auto)
    assert report["settings"]["postprocess"] == "cardiac" and report["settings"]["preset"] == {
        "name": "auto", "applied": ["postprocess"]}
    plain = tmp_path / "plain"
    result = runner.invoke(main, ["segment", "--images", str(cases[15]["C0"]), str(cases[15]["LGE"]), "--model",
                                  str(out), "--postprocess", "none", "--out", str(plain), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((plain / "report.json").read_text())["settings"]["postprocess"] == "none"  # given: kept
    for name in ("labels.nii.gz", "labels_LGE.nii.gz", "labels_C0.nii.gz", "posteriors.nii.gz", "params.json",
                 "transforms/transforms.json"):
        assert (seg / name).exists(), name
    # the joint registration and EM from the network's warp (the experiment's bayes-refine: the preset's
    # 5 mm region and affine weight unless given)
    icm = tmp_path / "icm"
    result = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), str(cases[15]["C0"]), "--model",
                                  str(out), "--register-atlas", "affine", "--out", str(icm),
                                  "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((icm / "report.json").read_text())
    assert report["settings"]["refine"] == "registration" and report["settings"]["roi_margin_mm"] == 5
    assert report["settings"]["preset"]["applied"] == ["affine_weight", "postprocess", "prior_votes", "roi_margin_mm"]
    assert report["settings"]["prior_votes"] is True  # em-all's vote, as the experiment's bayes-refine
    assert {"network_s", "registration_s", "fit_s"} <= set(report["timings_s"])
    assert report["registration"]["history"]  # the levels ran
    index = json.loads((icm / "transforms" / "transforms.json").read_text())["transforms"]["atlas"]
    assert [step["type"] for step in index] == ["displacement", "linear"]  # exp(v), then the refined linear map
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), str(cases[15]["C0"]), "--model",
                               str(out), "--register-atlas", "affine", "--refine", "2", "--out", str(tmp_path / "v"),
                               "-q"])
    assert bad.exit_code != 0 and "--refine" in bad.output and "--register-atlas" in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), str(cases[15]["C0"]), "--model",
                               str(out), "--prior-votes", "--out", str(tmp_path / "pv"), "-q"])
    assert bad.exit_code != 0 and "--prior-votes" in bad.output and "no registration" in bad.output
    # what the model fixes cannot be changed, and wrong inputs are named
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), str(cases[15]["C0"]), "--model", str(out),
                               "--atlas", "builtin:cardiac", "--out", str(tmp_path / "x"), "-q"])
    assert bad.exit_code != 0 and "--atlas" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), "--model", str(out),
                               "--out", str(tmp_path / "y"), "-q"])
    assert bad.exit_code != 0 and "reads LGE, C0" in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), "--model", str(tmp_path / "nothing"),
                               "--out", str(tmp_path / "z"), "-q"])
    assert bad.exit_code != 0 and "--model" in bad.output and "not a folder" in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[15]["LGE"]), "--refine", "2",
                               "--out", str(tmp_path / "w"), "-q"])
    assert bad.exit_code != 0 and "--refine" in bad.output and "--model" in bad.output
    check_ensemble(runner, out, cases[15], tmp_path)


def check_ensemble(runner, model, files, tmp_path):
    """``segment --model --ensemble``: the network's answer and the classical fit of the model's atlas (the
    preset's settings), averaged on every grid — C0's own grid too, each member having moved C0 its own
    way — and written as a segmentation; what the model fixes is refused."""
    from mvmm.amortized import segment_ensemble
    from mvmm.core.settings import RegistrationSettings

    images = [Image.read(files[s], s) for s in SEQUENCES]
    result = segment_ensemble(images, model, registration=RegistrationSettings(images="rigid"), device="cpu")
    fit, network = result.members
    assert fit.registration is not None and fit.registration.history  # the fit registered from the atlas's start
    assert torch.allclose(result.posterior, (fit.posterior + network.posterior) / 2)
    c0 = [result.native_posterior("C0"), fit.native_posterior("C0"), network.native_posterior("C0")]
    assert c0[0].shape[1:] == tuple(reversed(images[1].grid.size))
    assert torch.allclose(c0[0], (c0[1] + c0[2]) / 2)
    assert (c0[1] - c0[2]).abs().max() > 0.1  # the members differ there: the mean is not either one
    ens = tmp_path / "ensemble"
    result = runner.invoke(main, ["segment", "--images", str(files["LGE"]), str(files["C0"]), "--model", str(model),
                                  "--ensemble", "--max-iter", "7", "--out", str(ens), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((ens / "report.json").read_text())
    fit_settings, network_settings = report["settings"]["ensemble"]
    # the fit is the classical path's under the preset (auto: cardiac), the network's is its own
    assert fit_settings["registration"]["atlas_search_mm"] == 10 and fit_settings["roi_margin_mm"] == 5
    assert network_settings["model"] == str(model) and network_settings["refine"] == 0
    assert fit_settings["max_iter"] == 7  # the fit's own options reach it
    assert report["settings"]["preset"]["applied"] == ["affine_weight", "atlas_search_fov", "atlas_search_mm",
                                                       "postprocess", "prior_votes", "roi_margin_mm", "template_metric"]
    assert fit_settings["prior_votes"] is True
    for name in ("labels_LGE.nii.gz", "labels_C0.nii.gz", "transforms/transforms.json", "entropy.nii.gz"):
        assert (ens / name).exists(), name
    for extra in (["--atlas", "builtin:cardiac"], ["--subtypes", "LGE:Myo=3"], ["--refine", "2"],
                  ["--atlas-sigma", "2"]):
        bad = runner.invoke(main, ["segment", "--images", str(files["LGE"]), str(files["C0"]), "--model", str(model),
                                   "--ensemble", *extra, "--out", str(tmp_path / "bad"), "-q"])
        assert bad.exit_code != 0 and extra[0] in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(files["LGE"]), "--ensemble", "--out", str(tmp_path / "bad"),
                               "-q"])
    assert bad.exit_code != 0 and "--ensemble" in bad.output and "--model" in bad.output


def test_a_models_refinement_and_ensemble_refit_on_an_atlas_set_that_follows_them(cohort, tmp_path):
    """With a ``bayes`` model, the atlas set's label maps follow the fit that refined the network's warp, or the
    ensemble's classical fit, and that fit is repeated on their average (the experiment's ``bayes-refine`` and
    ``bayes-ensemble`` with its default prior, ``multi-atlas-fit``); the network alone has no fit to follow."""
    import shutil

    from mvmm.amortized import segment_ensemble
    from mvmm.core.settings import RegistrationSettings
    from mvmm.data.atlas_set import entries_of, read_atlas_set
    from mvmm.multi_atlas import FitGuidedSettings

    root, cases, table = cohort
    model = tmp_path / "model"
    train_bayes(subjects_from_csv(table, SEQUENCES)[:4], SEQUENCES, [root / "atlas.nii.gz"], model, TINY,
                TrainingSettings(epochs=2, lr=3e-3), device="cpu", progress=False)
    folder = tmp_path / "atlas-set"  # labelled LGE of other subjects, the MS-CMRSeg layout
    folder.mkdir()
    for seed in (20, 21, 22):
        shutil.copy(root / f"a{seed}" / "LGE.nii.gz", folder / f"a{seed}_LGE.nii.gz")
        shutil.copy(root / f"a{seed}" / "LGE_truth.nii.gz", folder / f"a{seed}_LGE_manual.nii.gz")
    entries = entries_of(read_atlas_set(folder), "LGE")
    images = [Image.read(cases[15][s], s) for s in SEQUENCES]
    guided = FitGuidedSettings(workers=1)
    refined = segment_with_model(images, model, registration=RegistrationSettings(atlas="affine"), device="cpu",
                                 atlas_set=entries, fit_guided=guided)
    assert refined.guide is not None and refined.guide.registration.history  # the refinement it followed
    assert refined.subject.atlas.source.startswith("multi-atlas") and "network_s" in refined.timings
    assert refined.settings["atlas_set"]["atlases"] == [e.name for e in entries]
    result = segment_ensemble(images, model, device="cpu", atlas_set=entries, fit_guided=guided)
    fit, network = result.members
    assert fit.guide is not None and fit.settings["atlas_set"]["guide"] == "fit" and network.guide is None
    assert torch.allclose(result.posterior, (fit.posterior + network.posterior) / 2)
    with pytest.raises(InputError, match="^atlas_set: .*no registration"):
        segment_with_model(images, model, device="cpu", atlas_set=entries)
    runner = CliRunner()
    args = ["segment", "--images", str(cases[15]["LGE"]), str(cases[15]["C0"]), "--model", str(model),
            "--atlas-set", str(folder), "--atlas-set-workers", "1", "--device", "cpu", "-q"]
    done = runner.invoke(main, args + ["--atlas-set-guide", "fit", "--ensemble", "--out", str(tmp_path / "ens")])
    assert done.exit_code == 0, done.output
    fit_settings, _ = json.loads((tmp_path / "ens" / "report.json").read_text())["settings"]["ensemble"]
    assert fit_settings["atlas_set"]["atlases"] == [e.name for e in entries]
    for extra, flag in ((["--ensemble"], "--atlas-set-guide"), (["--atlas-set-guide", "fit"], "--register-atlas")):
        bad = runner.invoke(main, args + extra + ["--out", str(tmp_path / "bad")])
        assert bad.exit_code == 1 and flag in bad.output and "Traceback" not in bad.output, bad.output


def test_3d_network_runs_one_step(tmp_path):
    """The same code in 3D (a short-axis stack): one forward/backward pass on a small grid."""
    phantom = make_phantom(seed=4)
    from mvmm.data.atlas import Atlas

    images = [phantom.images[s] for s in SEQUENCES]
    atlas = Atlas.builtin_cardiac(images[0].grid)
    settings = BayesNetSettings(grid_size=(32, 32, 8), grid_spacing=(4.5, 4.5, 10.0), channels=(4, 8),
                                features=4).resolved(3)
    case = prepare_case(placed_subject(images, atlas), settings)
    net = tiny_net(atlas, settings)
    batch = stack_cases([case])
    terms = bayes_loss(net, batch, net(batch), smoothness=1.0)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and net.velocity_head.weight.grad.abs().sum() > 0
    assert net(batch).velocity.shape[1] == 3


def test_settings_errors_name_the_parameter():
    with pytest.raises(InputError, match="BayesNetSettings.grid_size: every size must be a multiple of 8"):
        BayesNetSettings(grid_size=(50, 50)).resolved(2)
    with pytest.raises(InputError, match="BayesNetSettings.grid_size: 3D images need 3"):
        BayesNetSettings(grid_size=(48, 48)).resolved(3)
    with pytest.raises(InputError, match="TrainingSettings.epochs"):
        TrainingSettings(epochs=0)


def test_subject_table_errors_name_file_and_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("subject,LGE\na,a.nii.gz\n")
    with pytest.raises(InputError, match="no column C0"):
        subjects_from_csv(table, ["LGE", "C0"])
    table.write_text("subject,LGE,C0\na,a.nii.gz,\n")
    with pytest.raises(InputError, match="line 2: no C0 image for subject 'a'"):
        subjects_from_csv(table, ["LGE", "C0"])
    rows = subjects_from_csv(tmp_path / "t.csv", ["LGE"])
    assert rows == [SubjectRow("a", {"LGE": tmp_path / "a.nii.gz"})]


def test_phantom_segmentation_by_a_briefly_trained_network_finds_the_heart(cohort, tmp_path):
    """Not an accuracy claim: 20 epochs on four phantoms, tested on a fifth, find every structure."""
    root, cases, table = cohort
    rows = subjects_from_csv(table, SEQUENCES)[:4]
    out = tmp_path / "model"
    train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], out, TINY, TrainingSettings(epochs=20, lr=3e-3),
                device="cpu", progress=False)
    images = [Image.read(cases[15][s], s) for s in SEQUENCES]
    truth = Image.read(cases[15]["LGE_truth"], "truth").data[0].numpy().astype(int)
    seg = segment_with_model(images, out, device="cpu")
    dice = evaluate_labels(seg.label_map(), truth, tuple(reversed(images[0].grid.spacing)), CARDIAC_LABELS)
    assert min(dice[s]["dice"] for s in ("Myo", "LV", "RV")) > 0.5, dice


def test_proportions_are_held_unless_learned(cohort):
    """Held (the default, as the experiment's --proportions atlas): π is equal and the prior is the
    warped atlas; learned: the head predicts π and the loss reaches it."""
    from dataclasses import replace

    cases, atlas, settings = network_cases(cohort, [10])
    batch = stack_cases(cases)
    held = tiny_net(atlas, settings)(batch).params.log_proportions
    assert torch.allclose(held, torch.full_like(held, -np.log(len(atlas.labels))))
    learned_net = tiny_net(atlas, replace(settings, proportions="learned"))
    learned = learned_net(batch).params.log_proportions
    assert not torch.allclose(learned, held)
    learned.sum().backward()
    assert learned_net.appearance_head[-1].weight.grad[-1].abs().sum() > 0


def test_labelled_cross_entropy_is_the_negative_log_likelihood_of_the_known_labels():
    generator = torch.Generator().manual_seed(0)
    log_posterior = torch.log_softmax(torch.randn(2, 4, 5, 6, generator=generator), dim=1)
    labels = torch.randint(-1, 4, (2, 5, 6), generator=generator)
    from mvmm.mixture.functional import labelled_cross_entropy

    expected = torch.nn.functional.nll_loss(log_posterior, labels, ignore_index=-1)
    assert float(labelled_cross_entropy(log_posterior, labels)) == pytest.approx(float(expected), rel=1e-6)
    assert float(labelled_cross_entropy(log_posterior, torch.full_like(labels, -1))) == 0.0


def labelled_cases(cohort, seeds):
    """``network_cases`` with each case's label map as class indices on its network grid."""
    from mvmm.nets.data import case_labels

    root, files, _ = cohort
    cases, atlas, settings = network_cases(cohort, seeds)
    for case, seed in zip(cases, seeds):
        case.labels = case_labels(Image.read(files[seed]["LGE_truth"], "truth"), case.grid, atlas.labels)
    return cases, atlas, settings


def test_label_term_is_the_cross_entropy_of_the_segmentation_and_reaches_every_head(cohort):
    """Semi-supervised: the label term is −mean log P(label) of the very posterior the network's
    θ and warp give to EM's estimator, and its gradient reaches the warp and the appearance."""
    cases, atlas, settings = labelled_cases(cohort, [10, 11])
    net = tiny_net(atlas, settings)
    batch = stack_cases(cases)
    prediction = net(batch)
    terms = bayes_loss(net, batch, prediction, smoothness=0.0)
    posteriors = []
    for b in range(2):
        params = prediction.params.subject(b)
        model = MultivariateMixture(n_subtypes=params.n_subtypes)
        with torch.no_grad():
            model.adopt(params, batch["images"][b], batch["coverage"][b], prediction.warped_prior[b])
            posteriors.append(model.predict_proba(batch["images"][b], batch["coverage"][b], prediction.warped_prior[b]))
    log_p = torch.stack(posteriors).clamp_min(1e-30).log()
    expected = torch.nn.functional.nll_loss(log_p, batch["labels"], ignore_index=-1)
    assert float(terms["labels"].detach()) == pytest.approx(float(expected), rel=1e-4)
    total = terms["data"] + settings.label_weight * terms["labels"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    terms["labels"].backward()
    for name, module in (("velocity", net.velocity_head), ("appearance", net.appearance_head)):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0, name


def test_semi_supervised_training_lowers_the_label_term_and_records_its_subjects(cohort, tmp_path):
    root, files, _ = cohort
    rows = [SubjectRow(f"s{seed}", {s: files[seed][s] for s in SEQUENCES},
                       files[seed]["LGE_truth"] if seed in (10, 11) else None) for seed in (10, 11, 12, 13)]
    out = tmp_path / "model"
    # one batch, no augmentation: every epoch scores the same labelled voxels
    training = TrainingSettings(epochs=12, batch_size=4, lr=1e-3, augment=False)
    result = train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], out, TINY, training, device="cpu", progress=False,
                         labelled=["s10", "s11"])
    assert result["labelled"] == ["s10", "s11"]
    assert json.loads((out / "config.json").read_text())["labelled"] == ["s10", "s11"]
    history = json.loads((out / "log.json").read_text())["epochs"]
    assert history[-1]["labels"] < history[0]["labels"] - 0.01
    with pytest.raises(InputError, match="^labelled:.*s99"):
        train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], tmp_path / "x", TINY, TrainingSettings(epochs=1),
                    device="cpu", progress=False, labelled=["s99"])
    with pytest.raises(InputError, match="^labelled:.*s12 has no label map"):
        train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], tmp_path / "y", TINY, TrainingSettings(epochs=1),
                    device="cpu", progress=False, labelled=["s12"])
    # an unsupervised model says so
    plain = train_bayes(rows, SEQUENCES, [root / "atlas.nii.gz"], tmp_path / "z", TINY, TrainingSettings(epochs=1),
                        device="cpu", progress=False)
    assert plain["labelled"] == [] and "labels" not in json.loads((tmp_path / "z" / "log.json").read_text())["epochs"][0]


def test_cli_train_bayes_with_labelled_rows(cohort, tmp_path):
    root, files, _ = cohort
    table = tmp_path / "labelled.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "LGE", "C0", "labels"])
        for seed in (10, 11, 12):
            writer.writerow([f"s{seed}", files[seed]["LGE"], files[seed]["C0"], files[seed]["LGE_truth"] if seed != 12 else ""])
    runner = CliRunner()
    command = ["train", "bayes", "--data", str(table), "--sequences", "LGE", "C0", "--atlas", str(root / "atlas.nii.gz"),
               "--epochs", "1", "--device", "cpu", "-q"]
    result = runner.invoke(main, command + ["--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "(2 labelled)" in result.output
    bad = runner.invoke(main, command + ["--labelled-patients", "1-2", "--out", str(tmp_path / "n")])
    assert bad.exit_code != 0 and "--labelled-patients" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, command + ["--label-weight", "-1", "--out", str(tmp_path / "o")])
    assert bad.exit_code != 0 and "--label-weight" in bad.output


def test_a_scan_much_wider_than_the_network_grid_is_warned_about(cohort, caplog):
    """The networks sit at the field-of-view centre and do not search for the heart: an uncropped
    scan is said to be one, a crop is not."""
    from mvmm.core.grid import Grid

    _, atlas, settings = network_cases(cohort, [10])
    root, files, _ = cohort
    image = Image.read(files[10]["LGE"], "LGE")
    data = image.data[0].numpy()
    big = np.zeros(tuple(3 * n for n in data.shape), dtype=np.float32)
    big[tuple(slice(n, 2 * n) for n in data.shape)] = data
    wide_grid = Grid(tuple(3 * n for n in image.grid.size), image.grid.spacing,
                     tuple(image.grid.index_to_world_matrix[:2] @ np.r_[-np.asarray(image.grid.size), 1.0]),
                     image.grid.direction)
    wide = Image.from_array(big, wide_grid, "LGE", "wide.nii.gz")
    c0 = Image.read(files[10]["C0"], "C0")
    with caplog.at_level("WARNING", logger="mvmm.nets.data"):
        prepare_case(placed_subject([image, c0], atlas), settings)
        assert "much wider than the network grid" not in caplog.text
        prepare_case(placed_subject([wide, c0], atlas), settings)
    assert "wide.nii.gz: its field of view" in caplog.text and "crop the images around the heart" in caplog.text
