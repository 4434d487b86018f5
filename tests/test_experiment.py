import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mvmm.cli import main
from mvmm.data.atlas_set import AtlasEntry
from mvmm.data.manifest import Manifest, parse_patients, scan
from mvmm.data.phantom import make_phantom
from mvmm.core.errors import InputError
from mvmm.core.settings import FitGuidedSettings
from mvmm.experiments.mscmr import (CLASSICAL_METHODS as METHODS, ExperimentSettings, _cluster_names, _for_images,
                                    atlas_set_of, run_mscmr)
from conftest import SHARED_DATA


def write_patients(folder, numbers, lge_name="LGE", sequences=("LGE", "C0")):
    """2D phantoms laid out as MS-CMRSeg patients (patientN_<SEQ>[_manual].nii.gz); with T2, its MyoPS
    pathology labels too (the phantom's oedema, 1220)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        phantom = make_phantom(seed=n, ndim=2)
        for seq in sequences:
            name = lge_name if seq == "LGE" else seq
            phantom.images[seq].write(folder / f"patient{n}_{name}.nii.gz")
            truth = phantom.truth[seq]
            truth.data = truth.data.round().short()
            truth.write(folder / f"patient{n}_{name}_manual.nii.gz")
        if "T2" in sequences:
            oedema = phantom.oedema
            oedema.data = (oedema.data > 0.5).short() * 1220
            oedema.write(folder / f"patient{n}_T2_pathology.nii.gz")
    return folder


def test_manifest_describes_mscmr_and_scan_accepts_either_naming(tmp_path):
    manifest = Manifest.load("mscmr19")
    assert manifest.labels.as_dict() == {"bg": 0, "Myo": 200, "LV": 500, "RV": 600}
    assert manifest.canonical_sequence("de") == "LGE" and manifest.canonical_sequence("bSSFP") == "C0"
    assert any("Zhuang" in c for c in manifest.citation) and "registration" in manifest.obtain
    challenge = write_patients(tmp_path / "challenge", [1, 2], lge_name="DE")
    found = scan(manifest, challenge, [1, 2], ["LGE", "C0"], ["LGE"])
    assert not found.problems and found.patients[1].layout == "challenge"
    assert found.patients[2].images["LGE"].name == "patient2_DE.nii.gz"
    renamed = write_patients(tmp_path / "renamed", [3])
    found = scan(manifest, renamed, [3, 4], ["LGE", "C0", "T2"], ["LGE"])
    assert found.patients[3].layout == "renamed"
    assert any("patient 3: no T2 image (expected patient3_T2.nii.gz)" in p for p in found.problems)
    assert any("patient 4: no files" in p for p in found.problems)
    with pytest.raises(InputError, match="not a sequence"):
        manifest.canonical_sequence("FLAIR")
    with pytest.raises(InputError, match="not found"):
        Manifest.load("acdc17")
    assert parse_patients("1-3,7,2") == [1, 2, 3, 7]
    with pytest.raises(InputError, match="^patients: expected numbers"):
        parse_patients("1-x")


def test_manifest_is_found_where_an_installed_wheel_puts_it(tmp_path, monkeypatch):
    import shutil

    from mvmm.data import manifest as manifest_module

    installed = tmp_path / "share" / "mvmm" / "data_manifests"
    installed.mkdir(parents=True)
    shutil.copy(Manifest.load("mscmr19").path, installed)
    monkeypatch.setattr(manifest_module, "MANIFEST_DIRS", (tmp_path / "no-checkout", installed))
    assert Manifest.load("mscmr19").path == installed / "mscmr19.json"
    with pytest.raises(InputError, match="'acdc' not found .known: mscmr19; looked in"):
        Manifest.load("acdc")


def test_check_manifest_cli_reports_what_is_missing(tmp_path):
    data = write_patients(tmp_path / "d", [1, 2])
    (data / "patient2_LGE_manual.nii.gz").unlink()
    result = CliRunner().invoke(main, ["check-manifest", "mscmr19", "--data", str(data), "--sequences", "LGE", "C0"])
    assert result.exit_code == 1
    assert "patients found: 2" in result.output and "patient 2: no LGE manual labels" in result.output
    complete = CliRunner().invoke(main, ["check-manifest", "mscmr19", "--data", str(data), "--patients", "1",
                                         "--sequences", "LGE", "C0"])
    assert complete.exit_code == 0 and "no problems" in complete.output


def test_cluster_names_are_one_to_one_by_overlap_with_the_atlas():
    import numpy as np

    atlas = np.array([0, 0, 0, 0, 200, 200, 500, 500, 600, 0])
    clusters = np.array([2, 2, 2, 2, 0, 0, 3, 3, 1, 1])
    names = _cluster_names(clusters, atlas, [0, 200, 500, 600])
    assert names.tolist() == [200, 600, 0, 500]


def test_subtypes_of_the_lge_only_model_keep_what_concerns_the_lge():
    kept = _for_images(["LGE:Myo=2, C0:LV=2", "*:bg=3"], ["LGE"])
    assert kept == ["LGE:Myo=2", "*:bg=3"]


def test_mscmr_experiment_writes_tables_and_resumes(tmp_path):
    data = write_patients(tmp_path / "data", [1, 2, 3])
    out = tmp_path / "exp"
    # the group-wise prior: the tables and the resumption are the same with every prior (the default's
    # extra fit, three times over three patients, would triple this test's time)
    settings = ExperimentSettings(atlas_register="affine", device="cpu", prior="groupwise")
    summary = run_mscmr(data, out, settings, progress=False)
    assert summary["patients"] == [1, 2, 3]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(METHODS) * 3
    assert {r["method"] for r in rows} == set(METHODS)
    stored = json.loads((out / "summary.json").read_text())
    for method in METHODS:
        for structure in ("Myo", "LV", "RV"):
            assert 0.0 <= stored["methods"][method][structure]["dice_mean"] <= 1.0
    # the model beats nothing-at-all on the phantom: every structure is found
    assert min(stored["methods"]["em-all"][s]["dice_mean"] for s in ("Myo", "LV", "RV")) > 0.5
    # leave-one-out: no patient's atlas used its own labels
    for n in (1, 2, 3):
        record = json.loads((out / "patients" / f"patient{n}.json").read_text())
        assert n not in record["atlas_patients"] and len(record["atlas_patients"]) == 2
    assert (out / "figures" / "dice_boxplot.png").stat().st_size > 0
    markdown = (out / "summary.md").read_text()
    assert (out / "figures" / "patient2.png").exists() and "| em-all |" in markdown
    assert "postprocess cardiac" in markdown and summary["settings"]["postprocess"] == "cardiac"
    # seconds per patient: mean, median and max, and em-all's time by step (the start search among them)
    seconds = [json.loads((out / "patients" / f"patient{n}.json").read_text())["seconds"]["em-all"] for n in (1, 2, 3)]
    assert stored["seconds_per_patient_median"]["em-all"] == pytest.approx(float(np.median(seconds)))
    assert stored["seconds_per_patient_max"]["em-all"] == pytest.approx(max(seconds))
    split = stored["em_all_time_split_median_s"]
    assert {"registration_s", "fit_s", "registration: search"} <= set(split)
    assert 0 < split["fit_s"] < max(seconds) and "em-all's time by step" in markdown
    # a rerun resumes: finished patients are not redone
    stamp = (out / "patients" / "patient1.json").stat().st_mtime_ns
    run_mscmr(data, out, settings, progress=False)
    assert (out / "patients" / "patient1.json").stat().st_mtime_ns == stamp
    # redone with the atlases now cached, every number is the same as when they were built
    first = (out / "results.csv").read_text()
    run_mscmr(data, out, settings, force=True, progress=False)
    assert [row.split(",")[:6] for row in (out / "results.csv").read_text().splitlines()] == \
        [row.split(",")[:6] for row in first.splitlines()]
    # other settings in the same folder are refused without --force
    with pytest.raises(InputError, match="other settings"):
        run_mscmr(data, out, ExperimentSettings(atlas_register="none", device="cpu"), progress=False)


def test_mscmr_experiment_names_missing_files_and_uses_separate_atlas_data(tmp_path):
    data = write_patients(tmp_path / "targets", [5])
    atlases = write_patients(tmp_path / "atlases", [1, 2])
    with pytest.raises(InputError, match="no patient in .* has every sequence of `sequences` \\(LGE, C0, T2\\)"):
        run_mscmr(data, tmp_path / "o1", ExperimentSettings(sequences=["LGE", "C0", "T2"]), progress=False)
    with pytest.raises(InputError, match="unknown tissue 'Scar'"):
        run_mscmr(data, tmp_path / "o1", ExperimentSettings(subtypes=["LGE:Scar=2"]), progress=False)
    with pytest.raises(InputError, match="^ExperimentSettings.proportions: expected one of atlas, learned, got 'learnt'"):
        ExperimentSettings(proportions="learnt")
    with pytest.raises(InputError, match="^ExperimentSettings.affine_weight: expected >= 0"):
        ExperimentSettings(affine_weight=-1.0)
    with pytest.raises(InputError, match="^ExperimentSettings.mrf_beta: expected >= 0"):
        ExperimentSettings(mrf_beta=-0.5)
    with pytest.raises(InputError, match="^ExperimentSettings.postprocess: expected one of none, cardiac, got 'smooth'"):
        ExperimentSettings(postprocess="smooth")
    with pytest.raises(InputError, match="at least two atlas patients"):
        run_mscmr(data, tmp_path / "o2", ExperimentSettings(atlas_register="none"), progress=False)
    result = CliRunner().invoke(main, ["experiment", "mscmr", "--data", str(data), "--atlas-data", str(atlases),
                                       "--out", str(tmp_path / "o3"), "--atlas-register", "none", "--quiet",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o3" / "patients" / "patient5.json").read_text())
    assert record["atlas_patients"] == [1, 2] and "em-all" in result.output


MSCMR = SHARED_DATA / "mscmr"


@pytest.mark.skipif(not (MSCMR / "patient1_LGE.nii.gz").exists(), reason="MS-CMRSeg data not available")
def test_check_manifest_finds_the_shared_mscmr_copy():
    found = scan(Manifest.load("mscmr19"), MSCMR, parse_patients("1-25"), ["LGE", "C0"], ["LGE", "C0"])
    assert not found.problems and len(found.patients) == 25


@pytest.mark.parametrize("prior", ["groupwise", "template", "multi-atlas", "multi-atlas-fit"])
def test_mscmr_experiment_priors_leave_the_target_out_and_report_what_em_adds(tmp_path, prior):
    data = write_patients(tmp_path / "data", [1, 2, 3])
    out = tmp_path / prior
    settings = ExperimentSettings(prior=prior, methods=["em-all"], atlas_register="rigid", device="cpu")
    assert settings.methods == ["atlas", "em-all"]  # the prior alone always runs with em-all
    summary = run_mscmr(data, out, settings, patients=[2], progress=False)
    assert set(summary["methods"]) == {"atlas", "em-all"}
    record = json.loads((out / "patients" / "patient2.json").read_text())
    assert record["atlas_patients"] == [1, 3]
    assert record["atlas_set"] == (["patient1 LGE", "patient3 LGE"] if prior.startswith("multi-atlas") else None)
    assert min(record["metrics"]["atlas"][s]["dice"] for s in ("Myo", "LV", "RV")) > 0.5, record["metrics"]
    if prior == "multi-atlas-fit":  # em-all's first fit with the group-wise atlas guided the atlas set's labels
        assert {"guide_fit_s", "atlas_set_s"} <= set(record["em_all_timings_s"])
        assert record["atlas_set_fit"]["dropped"] == {} and set(record["atlas_set_fit"]["agreement"]) == {
            "patient1 LGE", "patient3 LGE"}
    split = summary["em_all_time_split_median_s"]
    if prior == "groupwise":  # em-all's time by step names its start search
        assert "registration: search" in split
    if prior == "multi-atlas-fit":  # the first fit (its search among its steps), the registrations, the fit again
        assert {"guide_fit_s", "atlas_set_s", "fit_s", "guide_registration: search"} <= set(split)
        assert 0 < split["fit_s"] < split["guide_fit_s"] + split["atlas_set_s"] < record["seconds"]["em-all"]
        # a folder whose second fits' prior was made otherwise (before 0.23.0: the maps' mean) is not resumed
        index = json.loads((out / "experiment.json").read_text())
        assert index["fit_guided"]["fusion"] == FitGuidedSettings().fusion == "joint"
        del index["fit_guided"]
        (out / "experiment.json").write_text(json.dumps(index))
        with pytest.raises(InputError, match="other settings"):
            run_mscmr(data, out, settings, patients=[2], progress=False)
    if prior == "template":  # the cached atlases carry the atlas patients' LGE and C0 templates
        sidecars = [json.loads(p.read_text()) for p in (out / "atlases").glob("*.json")]
        assert sidecars and all(set(meta["templates"]) == {"LGE", "C0"} for meta in sidecars)
    assert set(summary["em_all_vs_atlas"]) == {"Myo", "LV", "RV"}
    assert (out / "figures" / "em_vs_prior.png").stat().st_size > 0
    assert "em-all against its own prior alone" in (out / "summary.md").read_text()
    # each fit's own check is recorded, and the summary lists the fits that warned (none on the phantoms)
    assert record["quality"]["em-all"]["posterior_shift"] > record["quality"]["em-all"]["min_posterior_shift"]
    assert summary["low_posterior_shift"] == {"em-all": []}
    with pytest.raises(InputError, match="^ExperimentSettings.prior: expected one of"):
        ExperimentSettings(prior="majority")


def test_multi_atlas_priors_of_a_fold_use_the_other_folds_patients_only():
    entries = [AtlasEntry(f"patient{n}", "LGE", Path(f"p{n}.nii.gz"), Path(f"p{n}_manual.nii.gz")) for n in (1, 2, 3, 4, 12)]
    # patient 2's atlas patients with two folds (patient i in fold (i - 1) mod 2): 4 and 12 share its fold
    assert [e.subject for e in atlas_set_of(entries, {1: "a", 3: "b"}, False)] == ["patient1", "patient3"]
    assert len(atlas_set_of(entries, {1: "a"}, True)) == 5  # --atlas-data: another data set's patients, all


def test_mscmr_experiment_cross_validates_the_network_methods(tmp_path):
    """--folds: per fold, the atlas and the network come from the other folds' patients only (the
    network from their images), and every method of a target uses its fold's atlas."""
    data = write_patients(tmp_path / "data", [1, 2, 3, 4])
    out = tmp_path / "cv"
    # the networks' tests keep the quick group-wise prior (the default's second fit is tested above)
    settings = ExperimentSettings(atlas_register="none", methods=["em-all", "bayes", "bayes-refine"], folds=2,
                                  epochs=2, device="cpu", prior="groupwise")
    summary = run_mscmr(data, out, settings, progress=False)
    assert set(summary["methods"]) == {"atlas", "em-all", "bayes", "bayes-refine"}
    for n in (1, 2, 3, 4):
        record = json.loads((out / "patients" / f"patient{n}.json").read_text())
        fold = (n - 1) % 2
        assert record["fold"] == fold and record["atlas_patients"] == [p for p in (1, 2, 3, 4) if (p - 1) % 2 != fold]
        assert 0 <= record["metrics"]["bayes"]["LV"]["dice"] <= 1 and record["seconds"]["bayes"] > 0
    for fold in (0, 1):
        config = json.loads((out / "models" / f"fold{fold}" / "config.json").read_text())
        assert config["subjects"] == [f"patient{p}" for p in (1, 2, 3, 4) if (p - 1) % 2 != fold]
        assert summary["training"][f"fold{fold}"]["epochs"] == 2
        # the training's time is its epochs' (an interrupted and resumed one's included; see test_nets)
        epochs = json.loads((out / "models" / f"fold{fold}" / "log.json").read_text())["epochs"]
        assert summary["training"][f"fold{fold}"]["seconds"] == sum(h["seconds"] for h in epochs)
    # a trained model on other patients: leave-one-out atlases for em-all, the model for bayes (run for the
    # ensemble's sake, not reported); the default prior fits em-all and bayes-refine again on the atlas set
    given = run_mscmr(data, tmp_path / "given", ExperimentSettings(atlas_register="none",
                                                                     methods=["bayes-refine", "bayes-ensemble"],
                                                                     model=str(out / "models" / "fold1"), device="cpu"),
                      patients=[2], progress=False)  # fold 1's network was trained on patients 1 and 3
    assert set(given["methods"]) == {"atlas", "em-all", "bayes-refine", "bayes-ensemble"} and given["patients"] == [2]
    record = json.loads((tmp_path / "given" / "patients" / "patient2.json").read_text())
    refine_timings = record["network_timings_s"]["bayes-refine"]
    assert {"network_s", "guide_fit_s", "atlas_set_s"} <= set(refine_timings)
    assert "atlas_set_s" not in record["network_timings_s"]["bayes"]  # the network alone has no fit to follow
    assert "bayes-refine" in record["quality"] and "bayes-refine" in given["low_posterior_shift"]
    assert record["fold"] is None and 0 <= record["metrics"]["bayes-ensemble"]["Myo"]["dice"] <= 1
    assert record["seconds"]["bayes-ensemble"] >= record["seconds"]["em-all"] + record["seconds"]["bayes"]
    with pytest.raises(InputError, match="ExperimentSettings.methods: bayes, vae-seg-refine need `folds`"):
        ExperimentSettings(methods=["bayes", "vae-seg-refine"])
    result = CliRunner().invoke(main, ["experiment", "mscmr", "--data", str(data), "--out", str(tmp_path / "x"),
                                       "--methods", "bayes", "-q"])
    assert result.exit_code != 0 and "--folds" in result.output and "--model" in result.output


def test_vae_seg_methods_cross_validate_on_a_prior_per_fold_or_a_given_one(tmp_path):
    """vae-seg, vae-seg-refine with --folds: each fold's prior from its training patients' LGE labels only and the
    network from their images; or every fold's network on a given prior (no prior trained). Wrong kinds or
    classes are refused naming the setting; an older experiment folder (without these settings) resumes."""
    from mvmm.core.settings import PriorVaeSettings, TrainingSettings
    from mvmm.training import train_prior

    data = write_patients(tmp_path / "data", [1, 2, 3, 4])
    out = tmp_path / "cv"
    settings = ExperimentSettings(atlas_register="none", methods=["vae-seg"], folds=2, epochs=1, prior_epochs=2,
                                  device="cpu", prior="groupwise")
    summary = run_mscmr(data, out, settings, progress=False)
    assert set(summary["methods"]) == {"atlas", "em-all", "vae-seg"}
    for fold in (0, 1):
        training = [p for p in (1, 2, 3, 4) if (p - 1) % 2 != fold]
        prior = json.loads((out / "models" / f"prior{fold}" / "config.json").read_text())
        assert sorted(prior["subjects"]) == sorted(str(data / f"patient{p}_LGE_manual.nii.gz") for p in training)
        network = json.loads((out / "models" / f"vae-seg{fold}" / "config.json").read_text())
        assert network["subjects"] == [f"patient{p}" for p in training]
        assert summary["training"][f"prior{fold}"]["epochs"] == 2 and summary["training"][f"vae-seg{fold}"]["epochs"] == 1
    # an older folder, made before these settings existed, resumes (nothing is redone)
    index = json.loads((out / "experiment.json").read_text())
    del index["settings"]["vae_prior"]  # (at its default in this run, as every later setting is in an older one)
    (out / "experiment.json").write_text(json.dumps(index))
    before = (out / "patients" / "patient1.json").stat().st_mtime_ns
    run_mscmr(data, out, settings, progress=False)
    assert (out / "patients" / "patient1.json").stat().st_mtime_ns == before
    # one given prior under every fold's network; the refinement moves its decoded prior, and with the default
    # prior (multi-atlas-fit) the other fold's label maps follow that fit and it is fitted again, as em-all
    given = tmp_path / "given"
    summary = run_mscmr(data, given, ExperimentSettings(atlas_register="none", methods=["vae-seg-refine"], folds=2,
                                                        epochs=1, vae_prior=str(out / "models" / "prior0"),
                                                        device="cpu"), progress=False)
    assert not list((given / "models").glob("prior*")) and (given / "models" / "vae-seg1" / "config.json").exists()
    for n in (1, 2, 3, 4):
        record = json.loads((given / "patients" / f"patient{n}.json").read_text())
        assert 0 <= record["metrics"]["vae-seg-refine"]["Myo"]["dice"] <= 1 and record["seconds"]["vae-seg-refine"] > 0
        # the first fit's registration levels: the maps follow the moved decoded prior's fit, not the network's answer
        timings = record["network_timings_s"]["vae-seg-refine"]
        assert {"guide_fit_s", "atlas_set_s", "guide_registration_split_s"} <= set(timings)
        assert record["seconds"]["vae-seg-refine"] > timings["atlas_set_s"]
    with pytest.raises(InputError, match="ExperimentSettings.vae_prior"):
        ExperimentSettings(methods=["vae-seg"], model=str(out / "models" / "vae-seg0"), vae_prior=str(out))
    with pytest.raises(InputError, match="model: .* is a 'vae-seg' model"):
        run_mscmr(data, tmp_path / "kind", ExperimentSettings(atlas_register="none", methods=["bayes"], device="cpu",
                                                              model=str(out / "models" / "vae-seg0")), progress=False)
    other = tmp_path / "other-prior"
    train_prior([data / "patient1_LGE_manual.nii.gz"], "A=200,B=500,C=600", other, PriorVaeSettings(),
                TrainingSettings(epochs=1), device="cpu", progress=False)
    with pytest.raises(InputError, match="vae_prior: .* has the classes"):
        run_mscmr(data, tmp_path / "names", ExperimentSettings(atlas_register="none", methods=["vae-seg"], folds=2,
                                                               vae_prior=str(other), device="cpu"), progress=False)
    result = CliRunner().invoke(main, ["experiment", "mscmr", "--data", str(data), "--out", str(tmp_path / "x"),
                                       "--methods", "em-all", "--vae-prior", str(other), "-q"])
    assert result.exit_code != 0 and "--vae-prior" in result.output and "--folds" in result.output


def test_network_labels_train_each_fold_with_its_training_patients_labels_only(tmp_path):
    data = write_patients(tmp_path / "data", [1, 2, 3, 4])
    out = tmp_path / "cv"
    settings = ExperimentSettings(atlas_register="none", methods=["bayes"], folds=2, epochs=1, network_labels=True,
                                  device="cpu", prior="groupwise")
    summary = run_mscmr(data, out, settings, progress=False)
    for fold in (0, 1):
        training = [f"patient{p}" for p in (1, 2, 3, 4) if (p - 1) % 2 != fold]
        assert json.loads((out / "models" / f"fold{fold}" / "config.json").read_text())["labelled"] == training
        assert summary["training"][f"fold{fold}"]["labelled"] == training
        assert "labels" in json.loads((out / "models" / f"fold{fold}" / "log.json").read_text())["epochs"][0]


def test_three_sequences_skip_the_patients_without_t2_and_evaluate_pathology(tmp_path):
    data = write_patients(tmp_path / "data", [1, 2, 3], sequences=("LGE", "C0", "T2"))
    write_patients(data, [4])  # no T2, as MS-CMRSeg's patients 21 and 25
    settings = ExperimentSettings(sequences=["LGE", "C0", "T2"], methods=["em-all"], atlas_register="none",
                                  pathology=True, device="cpu")
    summary = run_mscmr(data, tmp_path / "out", settings, patients=[3, 4], progress=False)
    assert summary["patients"] == [3]
    assert summary["skipped"] == {"4": "no T2 image (expected patient4_T2.nii.gz)"}
    record = json.loads((tmp_path / "out" / "patients" / "patient3.json").read_text())
    assert set(record["native_metrics"]) == {"C0", "T2"}  # em-all on each sequence's own grid and labels
    assert record["native_metrics"]["T2"]["LV"]["dice"] > 0.7
    assert set(record["pathology"]) == {"scar", "scar+oedema", "volumes"}
    assert record["pathology"]["scar+oedema"]["volume_truth_ml"] > 0
    assert summary["pathology"]["scar+oedema"]["patients_with_manual"] == 1
    assert (tmp_path / "out" / "figures" / "pathology_volumes.png").exists()
    assert "Skipped: patient 4" in (tmp_path / "out" / "summary.md").read_text()


def _uncropped(folder, data, numbers, pad_mm=60.0):
    """Each patient's LGE and its labels pasted into a field of view ``pad_mm`` wider on every side, its
    heart off the new centre, 0 outside the old one (as mscmr_full holds the scanner's LGE)."""
    import torch

    from mvmm.data.image import Image
    from mvmm.spatial.warp import sample_image

    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        for suffix, mode in (("", "linear"), ("_manual", "nearest")):
            image = Image.read(data / f"patient{n}_LGE{suffix}.nii.gz", "LGE")
            grid = image.grid
            size = [int(s + 2 * pad_mm / sp) for s, sp in zip(grid.size, grid.spacing)]
            centre = grid.center_world() + grid.direction_matrix @ np.array([pad_mm / 2, -pad_mm / 3])
            wide = grid.with_size(size, grid.spacing, centre)
            values, inside = sample_image(image.data.double(), grid, wide.world_points(dtype=torch.float64), mode=mode)
            pasted = torch.where(inside, values[0], torch.zeros_like(values[0])).numpy()
            Image.from_array(pasted.astype(np.int16 if suffix else np.float32), wide, "LGE").write(
                folder / f"patient{n}_LGE{suffix}.nii.gz")
    return folder


def test_the_targets_lge_can_come_uncropped_from_another_folder(tmp_path):
    data = write_patients(tmp_path / "data", [1, 2, 3])
    full = _uncropped(tmp_path / "full", data, [3])
    settings = ExperimentSettings(sequences=["LGE"], atlas_register="affine", device="cpu")
    with pytest.raises(InputError, match="^lge_data: patient 2: no files in .*full"):
        run_mscmr(data, tmp_path / "o1", settings, patients=[2, 3], lge_data=full, progress=False)
    summary = run_mscmr(data, tmp_path / "o2", settings, patients=[3], lge_data=full, progress=False)
    assert json.loads((tmp_path / "o2" / "experiment.json").read_text())["lge_data"] == str(full.resolve())
    # segmented and evaluated on the uncropped LGE: its heart found away from the field-of-view centre
    assert min(summary["methods"]["em-all"][s]["dice_mean"] for s in ("Myo", "LV", "RV")) > 0.6, summary["methods"]
    record = json.loads((tmp_path / "o2" / "patients" / "patient3.json").read_text())
    # the default prior's first fit searched the field of view (multi-atlas-fit's label maps then followed it)
    assert "guide_registration: fov search" in summary["em_all_time_split_median_s"]
    assert record["atlas_patients"] == [1, 2]
