"""The Chan–Vese CNN and the anatomical-prior VAE (mvmm.nets.acwe, .prior, .vae_seg, mvmm.amortized):
the energies are the functional core's, gradients reach the trained weights (not a frozen prior), tiny
CPU runs lower the losses, checkpoints reload bit-identically, resumes are exact, and the commands
work end to end. Tiny networks on 2D phantoms, a few steps."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.core.errors import InputError
from mvmm.core.settings import AcweNetSettings, PriorVaeSettings, TrainingSettings, VaeSegSettings
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, parse_label_names
from mvmm.data.phantom import write_phantom
from mvmm.mixture.functional import negative_log_likelihood
from mvmm.mixture.params import MixtureParams
from mvmm.nets.acwe import boundary_length, region_energy, region_params
from mvmm.nets.data import SubjectRow, prepare_case, stack_cases
from mvmm.nets.model_dir import CHECKPOINT, load_model
from mvmm.amortized import averaged_posterior, segment_with_model
from mvmm.training import train_acwe, train_prior, train_vae_seg

SEQUENCES = ["LGE", "C0"]
TINY_ACWE = AcweNetSettings(grid_size=(32, 32), grid_spacing=(4.0, 4.0), channels=(4, 8, 16))
TINY_PRIOR = PriorVaeSettings(grid_size=(32, 32), grid_spacing=(4.0, 4.0), channels=(4, 8, 16), latent=4)
TINY_VAE = VaeSegSettings(channels=(4, 8, 16), em_steps=1)
CARDIAC_NAMES = "Myo=200,LV=500,RV=600"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Eight 2D phantom cases on disk (images and label maps), and a CSV of six with labels for two."""
    root = tmp_path_factory.mktemp("amortized")
    cases = {seed: write_phantom(root / f"s{seed}", seed=seed, ndim=2) for seed in range(30, 38)}
    table = root / "subjects.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "LGE", "C0", "labels"])
        for seed in range(30, 36):
            files = cases[seed]
            writer.writerow([f"s{seed}", files["LGE"].relative_to(root), files["C0"].relative_to(root),
                             files["LGE_truth"].relative_to(root) if seed < 32 else ""])
    return root, cases, table


def rows_of(cases, seeds, labelled=()):
    return [SubjectRow(f"s{s}", {q: cases[s][q] for q in SEQUENCES}, cases[s]["LGE_truth"] if s in labelled else None)
            for s in seeds]


def read_case(cases, seed):
    return [Image.read(cases[seed][q], q) for q in SEQUENCES]


# ---------------------------------------------------------------------------- Chan–Vese
def two_region_image(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(1, 1, 20, 30, generator=g) * 0.1, torch.randn(1, 1, 20, 30, generator=g) * 0.1 + 1], 3)
    return x, torch.ones_like(x, dtype=torch.bool)


def test_region_term_is_chan_vese_with_the_soft_means():
    x, cov = two_region_image()
    p = torch.rand(1, 2, 20, 60, generator=torch.Generator().manual_seed(1))
    p = p / p.sum(1, keepdim=True)
    params = region_params(x, cov, p, cov[:, 0])
    c = [(p[0, k] * x[0, 0]).sum() / p[0, k].sum() for k in range(2)]  # Chan–Vese's region constants
    np.testing.assert_allclose(params.means[0, 0, :, 0].numpy(), [float(v) for v in c], rtol=1e-6)
    cost = region_energy(x, cov, params)
    np.testing.assert_allclose(cost[0, 0].numpy(), ((x[0, 0] - c[0]) ** 2).numpy(), rtol=1e-4, atol=1e-6)


def test_region_term_is_the_mixture_nll_in_the_two_class_equal_variance_hard_limit():
    """Σ_x min_k (I − c_k)² (Chan–Vese at the hard assignment) = lim_{σ→0} 2σ² (NLL − V·const) of the
    two-class, equal-variance mixture the functional core evaluates."""
    x, cov = two_region_image()
    hard = torch.stack([x[:, 0] < 0.5, x[:, 0] >= 0.5], 1).float()
    params = region_params(x, cov, hard, cov[:, 0])
    chan_vese = float((hard * region_energy(x, cov, params)).sum())
    mu = params.means[0, 0, :, 0]
    assert chan_vese == pytest.approx(float(torch.minimum((x - mu[0]) ** 2, (x - mu[1]) ** 2).sum()), rel=1e-5)
    gaps = []
    for s in (1e-1, 1e-2, 1e-4):
        equal = MixtureParams(params.means, torch.full_like(params.variances, s), params.log_weights,
                              torch.log(torch.full((1, 2), 0.5, dtype=torch.float64)), params.n_subtypes)
        nll = float(negative_log_likelihood(x.double(), cov, equal, reduction="sum"))
        limit = 2 * s * (nll - x.numel() * (0.5 * math.log(2 * math.pi * s) + math.log(2)))
        gaps.append(abs(limit - chan_vese))
    assert gaps[0] > gaps[-1] and gaps[-1] < 1e-6 * chan_vese  # converges as σ² → 0


def test_boundary_length_of_a_hard_split_is_its_length():
    p = torch.zeros(1, 2, 20, 60)
    p[:, 0, :, :30], p[:, 1, :, 30:] = 1, 1
    length = boundary_length(p, (2.0, 1.0))  # spacing in ITK order (x: 2 mm)
    # 20 rows × 1 mm, the jump over 2 mm: |∇P| = 1/2 per class at the edge voxels, ½ Σ_k → 1/2 per row
    assert float(length.sum()) == pytest.approx(20 * 0.5, abs=1e-3 * 1200)


def test_acwe_energy_reaches_the_weights_and_training_lowers_it(cohort, tmp_path):
    root, cases, _ = cohort
    rows = rows_of(cases, range(30, 34))
    result = train_acwe(rows, SEQUENCES, tmp_path / "m", TINY_ACWE, TrainingSettings(epochs=8, lr=3e-3, seed=2),
                        device="cpu", progress=False)
    losses = [h["loss"] for h in json.loads((tmp_path / "m" / "log.json").read_text())["epochs"]]
    assert np.mean(losses[-3:]) < losses[0]
    assert result["classes"] == {"dark": 0, "bright": 1}
    model = load_model(tmp_path / "m")
    case = prepare_case(model_subject(cases, 34), model.config.network, require_atlas=False)
    batch = stack_cases([case])
    net = model.net.train()
    net.loss(batch, net(batch))["loss"].backward()
    for name, weight in net.named_parameters():
        assert weight.grad is not None and float(weight.grad.abs().sum()) > 0, name
    # the checkpoint and the weights reload bit-identically
    again = load_model(tmp_path / "m", weights=CHECKPOINT)
    for (name, a), (_, b) in zip(model.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model.net.eval()(batch).log_posterior, again.net(batch).log_posterior)


def model_subject(cases, seed):
    from mvmm.data.subject import Subject

    return Subject(read_case(cases, seed))


def test_acwe_semi_supervised_segment_and_refine(cohort, tmp_path):
    root, cases, _ = cohort
    rows = rows_of(cases, range(30, 35), labelled=(30, 31))
    result = train_acwe(rows, SEQUENCES, tmp_path / "m", TINY_ACWE, TrainingSettings(epochs=4, lr=3e-3),
                        labels=CARDIAC_LABELS, labelled=["s30", "s31"], device="cpu", progress=False)
    assert result["classes"] == CARDIAC_LABELS.as_dict() and result["labelled"] == ["s30", "s31"]
    log = json.loads((tmp_path / "m" / "log.json").read_text())["epochs"]
    assert log[0]["labels"] > 0  # the labelled cases' cross-entropy is a term
    alone = segment_with_model(read_case(cases, 36), tmp_path / "m", device="cpu")
    assert set(np.unique(alone.label_map())) <= set(CARDIAC_LABELS.values)
    # the network's map is the answer on every grid
    assert torch.allclose(alone.native_posterior("C0").sum(0), torch.ones(()), atol=1e-5)
    files = alone.write(tmp_path / "seg")
    assert {"labels", "labels_LGE", "labels_C0", "posteriors", "report"} <= set(files)
    refined = segment_with_model(read_case(cases, 36), tmp_path / "m", refine=3, device="cpu")
    bounds = refined.model.lower_bounds_
    assert all(b >= a - 1e-7 for a, b in zip(bounds, bounds[1:]))  # EM with the map as the prior


def test_acwe_with_the_atlas_as_prior_or_as_region(cohort, tmp_path):
    from dataclasses import replace

    from mvmm.atlas_build import GroupwiseSettings, build_atlas

    root, cases, _ = cohort
    atlas, _ = build_atlas([cases[s]["LGE_truth"] for s in (36, 37)], GroupwiseSettings(register="none", frame="axes"))
    rows = rows_of(cases, range(30, 33))
    named = train_acwe(rows, SEQUENCES, tmp_path / "prior", TINY_ACWE, TrainingSettings(epochs=1), atlas=atlas,
                       device="cpu", progress=False)
    assert named["classes"] == atlas.labels.as_dict()
    bounded = train_acwe(rows, SEQUENCES, tmp_path / "region", replace(TINY_ACWE, classes=2), TrainingSettings(epochs=1),
                         atlas=atlas, device="cpu", progress=False)
    assert bounded["classes"] == {"dark": 0, "bright": 1}
    for folder, role in (("prior", "prior"), ("region", "region")):
        model = load_model(tmp_path / folder)
        assert model.config.atlas_role == role and model.atlas is not None
        result = segment_with_model(read_case(cases, 36), model, device="cpu")
        # beyond the atlas's region of interest (on the network grid), the background
        region = prepare_case(model_subject_with(cases, 36, model), model.config.network).region
        predicted = result.subject.atlas.probabilities  # the network's map, [K, *S] on that grid
        background = predicted[model.config.labels.background_index]
        assert bool((~region).any()) and bool((background[~region] == 1).all())
        assert bool((background[region] < 1).any())


def model_subject_with(cases, seed, model):
    from mvmm.data.subject import Subject

    images = read_case(cases, seed)
    return Subject(images, atlas=model.atlas.placed_on(images[0].grid))


def test_acwe_errors_name_the_parameter(cohort, tmp_path):
    root, cases, _ = cohort
    rows = rows_of(cases, range(30, 33), labelled=(30,))
    with pytest.raises(InputError, match="^labels:"):
        train_acwe(rows, SEQUENCES, tmp_path / "a", TINY_ACWE, TrainingSettings(epochs=1), labelled=["s30"],
                   progress=False)
    with pytest.raises(InputError, match="^labelled:.*s99"):
        train_acwe(rows, SEQUENCES, tmp_path / "b", TINY_ACWE, TrainingSettings(epochs=1), labels=CARDIAC_LABELS,
                   labelled=["s99"], progress=False)
    with pytest.raises(InputError, match="^classes:"):
        train_acwe(rows, SEQUENCES, tmp_path / "c", replace_classes(3), TrainingSettings(epochs=1),
                   labels=CARDIAC_LABELS, labelled=["s30"], progress=False)
    with pytest.raises(InputError, match="AcweNetSettings.variances"):
        AcweNetSettings(variances="free")


def replace_classes(k):
    from dataclasses import replace

    return replace(TINY_ACWE, classes=k)


# ---------------------------------------------------------------------------- anatomical prior
def test_label_names_several_values_and_collisions():
    labels, index_of = parse_label_names("RV=1,Myo=2,LV=3,Myo=200,LV=500,RV=600")
    assert labels.as_dict() == {"bg": 0, "RV": 1, "Myo": 2, "LV": 3}
    assert index_of == {0: 0, 1: 1, 2: 2, 3: 3, 200: 2, 500: 3, 600: 1}
    with pytest.raises(InputError, match="^label_names:.*value 2"):
        parse_label_names("RV=2,Myo=2")
    with pytest.raises(InputError, match="^label_names:"):
        parse_label_names("RV")


@pytest.fixture(scope="module")
def prior_dir(cohort, tmp_path_factory):
    root, cases, _ = cohort
    out = tmp_path_factory.mktemp("prior") / "prior"
    maps = [cases[s]["LGE_truth"] for s in range(30, 38)] + [cases[s]["C0_truth"] for s in range(30, 34)]
    train_prior(maps, CARDIAC_NAMES, out, TINY_PRIOR, TrainingSettings(epochs=10, lr=3e-3, batch_size=4),
                device="cpu", progress=False)
    return out


def test_prior_training_lowers_the_elbo_and_names_the_classes(prior_dir):
    log = json.loads((prior_dir / "log.json").read_text())["epochs"]
    assert np.mean([h["loss"] for h in log[-3:]]) < log[0]["loss"]
    config = json.loads((prior_dir / "config.json").read_text())
    assert config["kind"] == "prior" and config["labels"] == {"bg": 0, "Myo": 200, "LV": 500, "RV": 600}
    assert config["label_names"]["Myo"] == [200]


def test_prior_refuses_unnamed_label_values(cohort, tmp_path):
    root, cases, _ = cohort
    with pytest.raises(InputError, match="^label_names:.*600"):
        train_prior([cases[30]["LGE_truth"]], "Myo=200,LV=500", tmp_path / "p", TINY_PRIOR,
                    TrainingSettings(epochs=1), progress=False)


def test_vae_seg_trains_the_encoder_only_and_resumes_exactly(cohort, prior_dir, tmp_path):
    root, cases, _ = cohort
    rows = rows_of(cases, range(30, 34))
    training = TrainingSettings(epochs=4, lr=3e-3, seed=5)
    train_vae_seg(rows, SEQUENCES, prior_dir, tmp_path / "whole", TINY_VAE, training, device="cpu", progress=False)
    train_vae_seg(rows, SEQUENCES, prior_dir, tmp_path / "split", TINY_VAE, TrainingSettings(epochs=2, lr=3e-3, seed=5),
                  device="cpu", progress=False)
    train_vae_seg(rows, SEQUENCES, prior_dir, tmp_path / "split", TINY_VAE, training, device="cpu", resume=True,
                  progress=False)
    whole = json.loads((tmp_path / "whole" / "log.json").read_text())["epochs"]
    split = json.loads((tmp_path / "split" / "log.json").read_text())["epochs"]
    np.testing.assert_allclose([h["loss"] for h in split], [h["loss"] for h in whole], rtol=1e-6)  # the draws of z too
    model, prior = load_model(tmp_path / "whole"), load_model(prior_dir)
    checkpoint = load_model(tmp_path / "whole", weights=CHECKPOINT)  # reloads bit-identically
    for (name, a), (_, b) in zip(model.net.state_dict().items(), checkpoint.net.state_dict().items()):
        assert torch.equal(a, b), name
    for name, weight in prior.net.state_dict().items():  # the prior is frozen: carried unchanged
        assert torch.equal(model.net.prior.state_dict()[name], weight), name
    case = prepare_case(model_subject(cases, 35), model.config.network, require_atlas=False)
    batch = stack_cases([case])
    net = model.net.train()
    net.loss(batch, net(batch))["loss"].backward()
    assert all(w.grad is None for w in net.prior.parameters())
    assert all(w.grad is not None for w in net.encoder.parameters())
    assert float(sum(w.grad.abs().sum() for w in net.encoder.parameters())) > 0


def test_vae_seg_segment_samples_and_refine(cohort, prior_dir, tmp_path):
    root, cases, _ = cohort
    out = tmp_path / "m"
    train_vae_seg(rows_of(cases, range(30, 34)), SEQUENCES, prior_dir, out, TINY_VAE,
                  TrainingSettings(epochs=2, lr=3e-3), device="cpu", progress=False)
    result = segment_with_model(read_case(cases, 36), out, samples=4, device="cpu")
    assert set(result.extra_maps) == {"uncertainty_variance", "uncertainty_entropy"}
    for values in result.extra_maps.values():
        assert tuple(values.shape) == result.common.grid.shape and bool((values >= -1e-6).all())
    assert float(result.extra_maps["uncertainty_entropy"].max()) <= math.log(4) + 1e-5
    files = result.write(tmp_path / "seg")
    assert (tmp_path / "seg" / "uncertainty_entropy.nii.gz").exists()
    assert json.loads(files["report"].read_text())["settings"]["samples"] == 4
    again = segment_with_model(read_case(cases, 36), out, samples=4, device="cpu")  # seeded: reproducible
    assert torch.equal(again.extra_maps["uncertainty_variance"], result.extra_maps["uncertainty_variance"])
    refined = segment_with_model(read_case(cases, 36), out, refine=3, device="cpu")
    bounds = refined.model.lower_bounds_
    assert bounds[-1] >= result.model.lower_bounds_[0] - 1e-7  # EM from the network's θ and decoded prior


def test_vae_seg_register_atlas_moves_the_decoded_prior_to_the_heart(cohort, prior_dir, tmp_path):
    """``registration``: the decoded prior is the joint solver's atlas, moved from where the network put it.
    The network's decoder is replaced by the case's own (smoothed) labels 6 mm off the heart: EM with the
    prior fixed leaves it there; the affine registration brings it back."""
    from dataclasses import replace

    from mvmm.data.atlas import Atlas
    from mvmm.data.subject import Subject
    from mvmm.joint import RegistrationSettings
    from mvmm.metrics import evaluate_labels
    from mvmm.spatial.warp import sample_image

    root, cases, _ = cohort
    out = tmp_path / "m"
    train_vae_seg(rows_of(cases, range(30, 34)), SEQUENCES, prior_dir, out, TINY_VAE,
                  TrainingSettings(epochs=1, lr=3e-3), device="cpu", progress=False)
    model = load_model(out, "cpu")
    images = read_case(cases, 36)
    truth = Image.read(cases[36]["LGE_truth"], "truth").data[0].numpy().round().astype(np.int64)
    shift = np.eye(3)
    shift[0, 2] = 6.0  # mm along x
    off = Atlas.from_label_maps([truth], images[0].grid.moved(shift), model.config.labels, sigma_mm=2.0)
    grid = prepare_case(Subject(images), model.config.network, require_atlas=False).grid
    shifted, _ = sample_image(off.probabilities, off.grid, grid.world_points())
    decoded = (0.98 * shifted + 0.02 / shifted.shape[0]).log()[None]
    network_predict = model.net.predict
    model.net.predict = lambda batch, z, *rest: replace(network_predict(batch, z, *rest), log_prior=decoded)

    def prior_myo_dice(result):  # the prior alone (argmax), where the fit left it: the experiment's `atlas`
        from mvmm.mixture.functional import most_probable_class

        prior = np.asarray(model.config.labels.values)[most_probable_class(result.common.prior).numpy()]
        scores = evaluate_labels(prior, truth, tuple(reversed(images[0].grid.spacing)), model.config.labels)
        return scores["Myo"]["dice"]

    fixed = segment_with_model(images, model, refine=20, device="cpu")
    moved = segment_with_model(images, model, device="cpu", registration=RegistrationSettings(
        atlas="affine", images_init="header", template_metric="none"), roi_margin_mm=10.0)
    assert moved.settings["refine"] == "registration" and moved.settings["kind"] == "vae-seg"
    assert {"network_s", "registration_s", "fit_s"} <= set(moved.timings)
    offset = moved.registration.transforms["atlas"].affine().detach().numpy()[:2, 2]
    assert abs(offset[0] - 6.0) < 1.0 and abs(offset[1]) < 1.0, offset  # the 6 mm undone
    assert prior_myo_dice(moved) > prior_myo_dice(fixed) + 0.2
    with pytest.raises(InputError, match="refine"):
        segment_with_model(images, model, device="cpu", registration=RegistrationSettings(atlas="affine"), refine=3)
    # every latent sample decodes the same (shifted) prior here: moved as the registration moved the mean
    # code's, each sample's posterior is the fitted one — no spread, and the entropy of their mean is the
    # written posterior's; left where the network decoded them, they would disagree with it by the 6 mm
    sampled = segment_with_model(images, model, device="cpu", samples=3, registration=RegistrationSettings(
        atlas="affine", images_init="header", template_metric="none"), roi_margin_mm=10.0)
    assert sampled.settings["samples"] == 3 and "samples_s" in sampled.timings
    maps = sampled.extra_maps
    assert maps["uncertainty_entropy"].shape == sampled.posterior.shape[1:]
    assert float(maps["uncertainty_variance"].abs().max()) < 1e-6
    own = sampled.entropy()
    assert torch.allclose(maps["uncertainty_entropy"].to(own.dtype), own, atol=1e-4)
    unmoved = replace(sampled.subject, transforms={}).sample_atlas(sampled.common.grid)
    left = sampled.model.predict_proba(sampled.common.images, sampled.common.coverage, unmoved,
                                       sampled.common.grid.spacing)
    assert float((left - sampled.posterior).abs().max()) > 0.5  # what the test would see if they were not moved


def test_cli_train_prior_vae_seg_acwe_and_segment(cohort, prior_dir, tmp_path):
    root, cases, table = cohort
    runner = CliRunner()
    acwe = tmp_path / "acwe"
    result = runner.invoke(main, ["train", "acwe", "--data", str(table), "--sequences", "LGE", "C0", "--epochs", "1",
                                  "--labels", "bg=0,Myo=200,LV=500,RV=600", "--out", str(acwe), "--device", "cpu",
                                  "-q"])
    assert result.exit_code == 0, result.output
    assert "(2 labelled)" in result.output  # the CSV's labels column
    bad = runner.invoke(main, ["train", "acwe", "--data", str(table), "--sequences", "LGE", "--labelled-patients", "1-2",
                               "--out", str(tmp_path / "x"), "-q"])
    assert bad.exit_code != 0 and "--labelled-patients" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["train", "acwe", "--data", str(table), "--sequences", "LGE", "--smoothness", "1",
                               "--out", str(tmp_path / "y"), "-q"])
    assert bad.exit_code != 0  # no velocity field to weigh
    prior = tmp_path / "prior"
    result = runner.invoke(main, ["train", "prior", "--labels", str(cases[30]["LGE_truth"]), str(cases[31]["LGE_truth"]),
                                  "--label-names", "Myo=200,LV=500", "--epochs", "1", "--out", str(prior), "-q"])
    assert result.exit_code != 0 and "--label-names" in result.output and "600" in result.output
    vae = tmp_path / "vae"
    result = runner.invoke(main, ["train", "vae-seg", "--data", str(table), "--prior", str(prior_dir), "--sequences",
                                  "LGE", "C0", "--epochs", "1", "--out", str(vae), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(main, ["train", "vae-seg", "--data", str(table), "--prior", str(acwe), "--sequences", "LGE",
                               "C0", "--out", str(tmp_path / "z"), "-q"])
    assert bad.exit_code != 0 and "--prior" in bad.output and "'acwe'" in bad.output
    seg = tmp_path / "seg"
    result = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model",
                                  str(vae), "--samples", "3", "--out", str(seg), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (seg / "uncertainty_variance.nii.gz").exists() and (seg / "labels_C0.nii.gz").exists()
    moved = tmp_path / "moved"
    result = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model",
                                  str(vae), "--register-atlas", "affine", "--out", str(moved), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((moved / "report.json").read_text())
    assert report["settings"]["refine"] == "registration" and "roi_margin_mm" in report["settings"]["preset"]["applied"]
    result = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model",
                                  str(vae), "--register-atlas", "affine", "--samples", "3", "--out", str(tmp_path / "u"),
                                  "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "u" / "uncertainty_entropy.nii.gz").exists()
    assert json.loads((tmp_path / "u" / "report.json").read_text())["settings"]["samples"] == 3
    bad = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model", str(vae),
                               "--register-atlas", "affine", "--refine", "3", "--out", str(tmp_path / "r"), "-q"])
    assert bad.exit_code != 0 and "--refine" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model", str(acwe),
                               "--samples", "3", "--out", str(tmp_path / "w"), "-q"])
    assert bad.exit_code != 0 and "--samples" in bad.output
    bad = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model", str(vae),
                               "--bias-correction", "n4", "--out", str(tmp_path / "n"), "-q"])
    assert bad.exit_code != 0 and "--bias-correction" in bad.output  # the network sees the images as in training
    bad = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), "--samples", "3",
                               "--out", str(tmp_path / "v"), "-q"])
    assert bad.exit_code != 0 and "--samples" in bad.output and "--model" in bad.output


def test_averaged_posterior_is_the_mean_of_fits_on_one_grid():
    """The ensemble of two fits of one case (bayes-ensemble: the network's and em-all's posteriors): the
    mean, so a voxel one fit calls weakly and the other strongly goes to the strong call; fits on other
    grids or with other labels are refused."""
    from types import SimpleNamespace

    from mvmm.core.grid import Grid
    from mvmm.data.labels import LabelSet

    grid = Grid((2, 1), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    labels = LabelSet(("BG", "Myo"), (0, 200))

    def fit(posterior, on=grid, named=labels):
        return SimpleNamespace(common=SimpleNamespace(grid=on), labels=named, device=torch.device("cpu"),
                               posterior=torch.tensor(posterior, dtype=torch.float32), votes=1)

    weak, strong = fit([[[0.6, 0.2]], [[0.4, 0.8]]]), fit([[[0.1, 0.3]], [[0.9, 0.7]]])
    average = averaged_posterior([weak, strong])
    assert torch.allclose(average, torch.tensor([[[0.35, 0.25]], [[0.65, 0.75]]]))
    assert average.argmax(0).tolist() == [[1, 1]]  # voxel 0: weak says BG 0.6, strong says Myo 0.9
    shifted = Grid((2, 1), (1.0, 1.0), (5.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="^results: the fits' common grids differ"):
        averaged_posterior([weak, fit([[[0.1, 0.3]], [[0.9, 0.7]]], on=shifted)])
    with pytest.raises(InputError, match="^results: the fits' labels differ"):
        averaged_posterior([weak, fit([[[0.1, 0.3]], [[0.9, 0.7]]], named=LabelSet(("BG", "LV"), (0, 500)))])


def test_vae_seg_refit_on_another_data_set_s_label_maps(cohort, prior_dir, tmp_path):
    """``registration`` and an atlas set: label maps of another data set (here valued and named as ACDC's:
    ``_gt``, 1 RV / 2 Myo / 3 LV) follow the registered decoded prior's fit, and the fit is repeated on their
    average as on an atlas (it votes, the proportions are learned); the decoded prior's fit does neither.
    Without ``registration`` they follow the network's own answer."""
    from mvmm.data import io
    from mvmm.data.atlas_set import label_maps_of, read_atlas_set
    from mvmm.joint import RegistrationSettings
    from mvmm.metrics import evaluate_labels
    from mvmm.multi_atlas import FitGuidedSettings

    root, cases, _ = cohort
    out = tmp_path / "m"
    train_vae_seg(rows_of(cases, range(30, 34)), SEQUENCES, prior_dir, out, TINY_VAE,
                  TrainingSettings(epochs=1, lr=3e-3), device="cpu", progress=False)
    folder = tmp_path / "acdc-like"
    folder.mkdir()
    for seed in (30, 31, 32):
        array, grid, _ = io.read_array(cases[seed]["LGE_truth"], "labels")
        acdc = np.select([array == 600, array == 200, array == 500], [1, 2, 3], 0).astype(np.int16)
        io.write_array(folder / f"s{seed}_frame01_gt.nii.gz", acdc, grid)
        io.write_array(folder / f"s{seed}_frame01.nii.gz", np.zeros_like(array, dtype=np.float32), grid)
    entries = label_maps_of(read_atlas_set(folder, label_names="RV=1,Myo=2,LV=3"), "LGE")
    images = read_case(cases, 36)
    registration = RegistrationSettings(atlas="affine", images_init="header", template_metric="none")
    refit = segment_with_model(images, out, device="cpu", registration=registration, roi_margin_mm=10.0,
                               atlas_set=entries, fit_guided=FitGuidedSettings(workers=1))
    assert refit.guide is not None and refit.subject.atlas.source.startswith("multi-atlas (3 label maps")
    assert refit.settings["kind"] == "vae-seg" and refit.settings["atlas_set"]["atlases"] == [e.name for e in entries]
    assert (refit.guide.settings["learn_proportions"], refit.guide.settings["prior_votes"]) == (False, False)
    assert (refit.settings["learn_proportions"], refit.settings["prior_votes"]) == (True, True)
    first = refit.guide  # the registered decoded prior's fit
    assert first.subject.atlas.source.endswith("(decoded prior)")
    truth = Image.read(cases[36]["LGE_truth"], "truth").data[0].numpy().round().astype(np.int64)
    spacing = tuple(reversed(images[0].grid.spacing))

    def dice(result):
        scores = evaluate_labels(result.label_map(), truth, spacing, result.labels)
        return np.mean([scores[n]["dice"] for n in ("Myo", "LV", "RV")])

    # real shapes where the fit put the heart
    assert dice(refit) > max(0.9, dice(first) + 0.1), (dice(first), dice(refit))
    with pytest.raises(InputError, match="^atlas_set: .*samples"):
        segment_with_model(images, out, device="cpu", registration=registration, samples=2, atlas_set=entries)
    # without a registration the label maps follow the network's own answer (an option; the experiment registers)
    alone = segment_with_model(images, out, device="cpu")
    on_answer = segment_with_model(images, out, device="cpu", roi_margin_mm=10.0, atlas_set=entries,
                                   fit_guided=FitGuidedSettings(workers=1))
    assert on_answer.settings["guide"] == "network" and on_answer.guide.settings["refine"] == 0
    assert torch.equal(on_answer.guide.posterior, alone.posterior) and on_answer.guide.registration is None
    assert on_answer.subject.atlas.source.startswith("multi-atlas (3 label maps")
    assert on_answer.subject.roi_margin_mm == 10
    assert (on_answer.settings["learn_proportions"], on_answer.settings["prior_votes"]) == (True, True)
    assert {"network_s", "guide_fit_s", "atlas_set_s"} <= set(on_answer.timings)
    assert dice(on_answer) > max(0.8, dice(alone) + 0.3), (dice(alone), dice(on_answer))  # 0.25 -> 0.86 here
    with pytest.raises(InputError, match="^atlas_set: .*refine"):
        segment_with_model(images, out, device="cpu", refine=2, atlas_set=entries)
    runner = CliRunner()
    args = ["segment", "--images", str(cases[36]["LGE"]), str(cases[36]["C0"]), "--model", str(out), "--register-atlas",
            "affine", "--atlas-set", str(folder), "--atlas-set-guide", "fit", "--atlas-set-workers", "1",
            "--device", "cpu", "-q"]
    done = runner.invoke(main, args + ["--atlas-set-labels", "RV=1,Myo=2,LV=3", "--out", str(tmp_path / "cli")])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["settings"]["atlas_set"]["atlases"] == [e.name for e in entries]
    assert report["settings"]["guide"] == "registration"
    args_on_answer = [a for a in args if a not in ("--register-atlas", "affine")]  # the network's answer guides
    done = runner.invoke(main, args_on_answer + ["--atlas-set-labels", "RV=1,Myo=2,LV=3", "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "a" / "report.json").read_text())["settings"]["guide"] == "network"
    unnamed = runner.invoke(main, args + ["--out", str(tmp_path / "bad")])  # ACDC's values, not named: before any fit
    assert unnamed.exit_code == 1 and "label values [1, 2, 3]" in unnamed.output and "Traceback" not in unnamed.output
    assert not (tmp_path / "bad").exists()
    alone = runner.invoke(main, ["segment", "--images", str(cases[36]["LGE"]), "--atlas-set-labels", "RV=1",
                                 "--out", str(tmp_path / "bad2"), "-q"])
    assert alone.exit_code == 1 and "--atlas-set-labels" in alone.output and "--atlas-set" in alone.output
