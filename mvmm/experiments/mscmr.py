"""The MS-CMRSeg 2019 experiment: leave-one-out (or separate) atlases, four methods, one results table.

For each target patient a probabilistic atlas is built group-wise (:mod:`mvmm.atlas_build`, image-axes
frame) from the manual labels of the *atlas patients* — the other patients of ``--data``, or those of
``--atlas-data`` — with mean intensity templates of their images, and placed on the target's LGE by its
image axes and field-of-view centre; the ``template`` prior then registers its LGE template to the
target's LGE, while the ``multi-atlas`` prior instead fuses the atlas patients' labelled LGE images
registered to the target (:mod:`mvmm.multi_atlas`; ``ExperimentSettings.prior``), and the default
``multi-atlas-fit`` registers their label maps to each classical fit's posterior and fits again on
their average. Then:

- ``em-all``: the joint model on all given sequences, the atlas registered inside it;
- ``atlas``: the atlas alone (argmax), as ``em-all`` registered it;
- ``em-lge``: the joint model on the LGE alone, the atlas registered inside it;
- ``gmm``: the plain mixture (no atlas) on all sequences, one Gaussian per class; clusters are named
  one-to-one by the best Dice with the registered atlas (so no label of the target names them);
- ``bayes``, ``bayes-refine``: the Bayesian segmentation CNN (:mod:`mvmm.nets.bayes`) alone, and
  followed by ``em-all``'s registration levels and EM from the network's warp (with ``multi-atlas-fit``
  fitted again on the atlas set's labels registered to it, as ``em-all``); from a given model,
  or with ``folds`` a network trained per fold on the other folds' images (and every method of the
  fold then uses the other folds' atlas); ``bayes-ensemble``, the mean of ``bayes``'s and ``em-all``'s
  posteriors weighted by their voters (``em-all``'s atlas votes with ``prior_votes``;
  :func:`mvmm.amortized.ensemble`; ``mvmm segment --model --ensemble``), cleaned up as ``em-all``'s;
  its seconds are both;
- ``vae-seg``, ``vae-seg-refine``: the segmentation network on an anatomical prior
  (:mod:`mvmm.nets.vae_seg`) alone, and its decoded prior moved by the same registration levels, then
  EM (with ``multi-atlas-fit`` fitted again on the atlas set's labels registered to it, as ``em-all``); with
  ``folds``, on ``vae_prior`` (e.g. a prior trained on another data set's labels) or on a
  prior trained on the fold's LGE labels, the network on the fold's images.

The label maps of ``em-all`` and ``em-lge`` are cleaned up as ``settings.postprocess`` says (by
default :mod:`mvmm.postprocess`'s ``cardiac``: papillary muscles counted as LV, islands removed);
those of ``atlas`` and ``gmm`` are left as they are. Each is evaluated on the target's LGE manual
labels (used for nothing else): Dice, HD95 and MSD per structure, with the seconds it took. A
finished patient is kept in ``DIR/patients/`` and skipped when the run is repeated with the same
settings (unless ``force``); atlases are kept in ``DIR/atlases/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from mvmm.atlas_build import GroupwiseSettings, build_atlas
from mvmm.data.atlas import Atlas
from mvmm.data.atlas_set import AtlasEntry
from mvmm.data.image import Image
from mvmm.data.manifest import Manifest, expected_names, scan
from mvmm.data.subject import Subject
from mvmm.core.devices import resolve_device
from mvmm.core.settings import CLASSICAL_METHODS, EXPERIMENT_METHODS as METHODS  # noqa: F401 (re-exported)
from mvmm.core.settings import BAYES_METHODS, VAE_METHODS, FitGuidedSettings
from mvmm.core.settings import ExperimentSettings  # noqa: F401 (re-exported)
from mvmm.core.errors import InputError
from mvmm.experiments.summary import write_summary
from mvmm.joint import RegistrationSettings
from mvmm.metrics import evaluate_labels, pathology_metrics
from mvmm.multi_atlas import MultiAtlasSettings, multi_atlas_prior
from mvmm.mixture.functional import most_probable_class
from mvmm.mixture.subtypes import parse_subtypes, subtype_items
from mvmm.core.outputs import write_json
from mvmm.data.labels import PATHOLOGY_LABELS
from mvmm.pathology import cardiac_pathology_subtypes, pathology_maps
from mvmm.report import comparison_figure
from mvmm.amortized import ensemble, segment_with_model
from mvmm.segment import segment_subject

log = logging.getLogger(__name__)

EXPERIMENT_FORMAT = "mvmm-experiment/1"


def _atlas_for(pool: Dict[int, Path], images: Dict[str, Dict[int, Path]], out: Path, device, progress: bool,
               register: str) -> tuple:
    """The group-wise atlas of the label maps in ``pool``, with an intensity template of each sequence
    of ``images`` (``{sequence: {patient: path}}``), cached in ``out/atlases``; and its build seconds."""
    patients = sorted(pool)
    paths = {sequence: [by_patient.get(p) for p in patients] for sequence, by_patient in images.items()}
    # resolved paths: the same files named from another folder (or by a relative path) are the same atlas
    key = hashlib.sha1(json.dumps([register, "templates"] + [str(Path(pool[p]).resolve()) for p in patients]
                                  + sorted(f"{q}: {Path(v).resolve() if v else None}" for q, ps in paths.items()
                                           for v in ps)).encode()).hexdigest()[:12]
    path = out / "atlases" / f"atlas_{key}.nii.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        atlas, report = build_atlas([pool[p] for p in patients], GroupwiseSettings(register=register, frame="axes"),
                                    device=device, progress=progress, images=paths)
        atlas.save(path, extra={"build": {**report, "seconds": time.perf_counter() - start, "patients": sorted(pool)}})
    # Always the saved copy: NIfTI rounds the atlas's origin (~1e-6 mm) and probabilities (~1e-7), and
    # some patients' registrations are that sensitive, so a rerun from the cache must see what this run saw.
    meta = json.loads(path.with_name(f"atlas_{key}.json").read_text())
    return Atlas.read([path]), meta["build"]["seconds"]


def _cluster_names(clusters: np.ndarray, atlas_labels: np.ndarray, values: List[int]) -> np.ndarray:
    """Label value per cluster index: a one-to-one naming that maximises the Dice with the registered atlas.

    ``clusters`` holds cluster indices ``0..K-1``, ``atlas_labels`` label values, both of one shape.
    """
    dice = np.zeros((len(values), len(values)))
    for k in range(len(values)):
        cluster = clusters == k
        for j, value in enumerate(values):
            structure = atlas_labels == value
            total = cluster.sum() + structure.sum()
            dice[k, j] = 2.0 * (cluster & structure).sum() / total if total else 0.0
    rows, cols = linear_sum_assignment(-dice)
    names = np.zeros(len(values), dtype=np.int64)
    names[rows] = np.asarray(values)[cols]
    return names


def _for_images(subtypes: List[str], names: List[str]) -> List[str]:
    """The ``IMAGE:TISSUE=N`` items that concern one of ``names`` (or every image, ``*``)."""
    return [item for item in subtype_items(subtypes) if item.split(":", 1)[0].strip() in names + ["*"]]


def _multi_atlas(target_lge: Image, entries: List[AtlasEntry], settings: ExperimentSettings, progress: bool):
    """The fused prior of the atlas patients' LGE images on the target's LGE, and its seconds."""
    multi = MultiAtlasSettings(size=settings.atlas_set_size, workers=0)
    atlas, report = multi_atlas_prior(target_lge, entries, multi, labels=Manifest.load("mscmr19").labels,
                                      device=settings.device if settings.device != "auto" else None,
                                      progress=progress)
    return atlas, report["seconds"]


def atlas_set_of(entries: Sequence[AtlasEntry], atlas_patients, other_data: bool) -> List[AtlasEntry]:
    """The multi-atlas priors' atlas set of a target: the labelled LGE of its ``atlas_patients`` (numbers;
    with folds the other folds', else all but the target), or every entry when they come from ``--atlas-data``."""
    return [e for e in entries if other_data or int(e.subject[len("patient"):]) in atlas_patients]


def em_all_registration(settings: ExperimentSettings) -> RegistrationSettings:
    """The registration of the experiment's ``em-all`` (and the start of its other classical methods)."""
    return RegistrationSettings(atlas=settings.register_atlas, images=settings.register_images, images_init="header",
                                atlas_search_fov=settings.atlas_search_fov, atlas_search_mm=settings.atlas_search_mm,
                                affine_weight=settings.affine_weight,
                                # the template prior's placement; multi-atlas-fit's first fit is the group-wise one
                                template_metric="ncc" if settings.prior == "template" else "none",
                                template_sequence=settings.template_sequence,
                                template_transform=settings.template_transform)


def network_refinement(settings: ExperimentSettings) -> RegistrationSettings:
    """``bayes-refine``'s registration: ``em-all``'s levels from where the network placed the atlas (no start
    search, no template) — chosen over EM alone with the warp fixed on a development fold."""
    return replace(em_all_registration(settings), atlas_search_fov=False, atlas_search_mm=0.0, template_metric="none")


def em_all_subtypes(settings: ExperimentSettings) -> List[str]:
    """``em-all``'s subtype items: with pathology, the named subtypes come last (they replace the LGE
    and T2 myocardium's counts)."""
    return list(settings.subtypes) + (cardiac_pathology_subtypes(settings.sequences) if settings.pathology else [])


def fit_em_all(images: List[Image], placed: Atlas, settings: ExperimentSettings,
               registration: Optional[RegistrationSettings] = None, atlas_set: Sequence[AtlasEntry] = ()):
    """The experiment's ``em-all`` on one case: every image, the ``placed`` atlas, registration and EM
    (:func:`mvmm.segment.segment_subject`); the :class:`~mvmm.segment.Segmentation`. ``atlas_set``: the
    ``multi-atlas-fit`` prior's labelled images, registered to this fit's posterior and fitted again."""
    return segment_subject(Subject(images, atlas=placed, roi_margin_mm=settings.roi_margin_mm),
                           subtypes=em_all_subtypes(settings), learn_proportions=settings.proportions == "learned",
                           mrf_beta=settings.mrf_beta,
                           registration=em_all_registration(settings) if registration is None else registration,
                           postprocess=settings.postprocess, device=settings.device, seed=settings.seed,
                           bias_correction=settings.bias_correction, prior_votes=settings.prior_votes,
                           atlas_set=atlas_set, pathology_rule=settings.pathology_settings())


def run_patient(target: int, files, atlas: Atlas, settings: ExperimentSettings,
                atlas_set: Optional[List[AtlasEntry]] = None, progress: bool = False,
                models: Optional[dict] = None) -> dict:
    """Every method on one target; returns metrics, seconds and label maps (LGE grid).

    ``atlas`` is the atlas patients' group-wise atlas (with templates); for the ``multi-atlas`` prior,
    ``atlas_set`` holds their labelled LGE images instead, for ``multi-atlas-fit`` as well as the atlas. ``models``: the trained networks of the
    network methods by kind (``{"bayes": LoadedModel, "vae-seg": LoadedModel}``, those needed).
    """
    images = [Image.read(files.images[s], s) for s in settings.sequences]
    truth = Image.read(files.labels["LGE"], "LGE manual", argname="data")
    registration = em_all_registration(settings)
    maps, seconds = {}, {}
    prior_seconds = 0.0
    if settings.prior == "multi-atlas":
        # the prior is already the target's own: no start search (its placement is the registrations')
        placed, prior_seconds = _multi_atlas(images[0], atlas_set, settings, progress)
        registration = replace(registration, atlas_search_fov=False, atlas_search_mm=0.0)
    else:
        placed = atlas.placed_on(images[0].grid)
    # multi-atlas-fit: every classical fit is fitted again on the atlas set's labels registered to its posterior
    guided = list(atlas_set) if settings.prior == "multi-atlas-fit" else []
    start = time.perf_counter()
    roi, learn = settings.roi_margin_mm, settings.proportions == "learned"
    subtypes = em_all_subtypes(settings)
    em_all = fit_em_all(images, placed, settings, registration, guided)
    maps["em-all"] = em_all.label_map()
    seconds["em-all"] = time.perf_counter() - start + prior_seconds
    quality = {"em-all": em_all.quality()}  # the fit's own check (mvmm.segment.check_posterior_shift)
    native = _native_metrics(em_all, images[1:], files, placed.labels)
    pathology = _pathology_metrics(em_all, files) if settings.pathology else {}
    values = list(placed.labels.values)
    maps["atlas"] = np.asarray(values)[most_probable_class(em_all.common.prior).cpu().numpy()]
    seconds["atlas"] = (em_all.timings["bias_s"] + em_all.timings["registration_s"] + em_all.timings["sample_s"]
                        + prior_seconds + em_all.timings.get("guide_fit_s", 0.0) + em_all.timings.get("atlas_set_s", 0.0))
    if "em-lge" in settings.methods:
        start = time.perf_counter()
        lge_only = segment_subject(Subject(images[:1], atlas=placed, roi_margin_mm=roi),
                                   subtypes=_for_images(subtypes, ["LGE"]), learn_proportions=learn,
                                   mrf_beta=settings.mrf_beta, registration=registration,
                                   postprocess=settings.postprocess, device=settings.device, seed=settings.seed,
                                   bias_correction=settings.bias_correction, prior_votes=settings.prior_votes,
                                   atlas_set=guided, pathology_rule=settings.pathology_settings())
        maps["em-lge"] = lge_only.label_map()
        quality["em-lge"] = lge_only.quality()
        seconds["em-lge"] = time.perf_counter() - start + prior_seconds
    if "gmm" in settings.methods:
        start = time.perf_counter()
        plain = segment_subject(Subject(images, labels=placed.labels), background_subtypes=1,
                                device=settings.device, seed=settings.seed)
        clusters = most_probable_class(plain.posterior).cpu().numpy()
        maps["gmm"] = _cluster_names(clusters, maps["atlas"], values)[clusters]
        seconds["gmm"] = time.perf_counter() - start
    from_network = network_refinement(settings)
    network_runs = {"bayes": ("bayes", None), "bayes-refine": ("bayes", from_network),
                    "vae-seg": ("vae-seg", None), "vae-seg-refine": ("vae-seg", from_network)}
    network_results = {}
    for method, (kind, refinement) in network_runs.items():
        # bayes-ensemble needs bayes's posterior, whether or not bayes is reported
        if method in settings.methods or (method == "bayes" and "bayes-ensemble" in settings.methods):
            model = models[kind]
            # files to labels: the images are read again, as `mvmm segment --model` would
            start = time.perf_counter()
            case = [Image.read(files.images[s], s) for s in model.config.images]
            # the refinements are classical fits too (from the network's warp or its moved decoded prior):
            # multi-atlas-fit fits them again on the atlas patients' label maps registered to them, as em-all
            result = segment_with_model(case, model, mrf_beta=settings.mrf_beta, learn_proportions=learn,
                                        postprocess=settings.postprocess, device=settings.device,
                                        registration=refinement, roi_margin_mm=roi if refinement else None,
                                        prior_votes=settings.prior_votes and method == "bayes-refine",
                                        atlas_set=guided if refinement is not None else ())
            maps[method] = result.label_map()
            seconds[method] = time.perf_counter() - start
            network_results[method] = result
            if refinement is not None:  # a fit from the network's start: its own check, as em-all's
                quality[method] = result.quality()
    if "bayes-ensemble" in settings.methods:
        start = time.perf_counter()
        # em-all first: the mean's map is cleaned up exactly as em-all's is
        maps["bayes-ensemble"] = ensemble([em_all, network_results["bayes"]]).label_map()
        seconds["bayes-ensemble"] = seconds["em-all"] + seconds["bayes"] + time.perf_counter() - start
    truth_map = truth.data[0].numpy().astype(np.int64)
    if truth_map.shape != maps["em-all"].shape:
        raise InputError(f"data: {files.labels['LGE']} is not on the grid of {files.images['LGE']}")
    spacing = tuple(reversed(images[0].grid.spacing))
    metrics = {m: evaluate_labels(maps[m], truth_map, spacing, placed.labels) for m in settings.methods}
    return {"patient": target, "metrics": metrics, "native_metrics": native, "pathology": pathology,
            "seconds": seconds, "em_all_timings_s": em_all.timings, "quality": quality, "maps": maps,
            "network_timings_s": {m: r.timings for m, r in network_results.items()},
            "atlas_set": [e.name for e in atlas_set] if settings.prior.startswith("multi-atlas") else None,
            # multi-atlas-fit: which label maps the fit kept and how well each ended on it
            "atlas_set_fit": {key: em_all.settings["atlas_set"][key] for key in ("dropped", "agreement")}
            if guided else None,
            "image": images[0].data[0].cpu().numpy(), "truth": truth_map}


def _pathology_metrics(result, files) -> dict:
    """em-all's scar and oedema on the T2 grid against the patient's MyoPS labels there (empty without them)."""
    if "T2" not in files.pathology or "T2" not in result.common.names:
        return {}
    maps = pathology_maps(result, "T2")
    truth = Image.read(files.pathology["T2"], "T2 pathology", argname="data")
    if truth.grid.shape != maps.grid.shape:
        raise InputError(f"data: {files.pathology['T2']} is not on the grid of {files.images['T2']}")
    truth_map = truth.data[0].numpy().astype(np.int64)
    unknown = set(np.unique(truth_map).tolist()) - {0, *PATHOLOGY_LABELS.values()}
    if unknown:
        raise InputError(f"data: {files.pathology['T2']} has values {sorted(unknown)}; expected 0 and the MyoPS "
                         f"values {PATHOLOGY_LABELS}")
    metrics = pathology_metrics(maps.label_map(), truth_map, tuple(reversed(maps.grid.spacing)), PATHOLOGY_LABELS)
    metrics["volumes"] = maps.volumes()  # ml and % of myocardium on the T2 grid
    return metrics


def _native_metrics(result, images: List[Image], files, labels) -> Dict[str, dict]:
    """em-all's labels on each other image's own grid against that sequence's manual labels (where given)."""
    metrics = {}
    for image in images:
        if image.name not in files.labels:
            continue
        truth = Image.read(files.labels[image.name], f"{image.name} manual", argname="data")
        if truth.grid.shape != image.grid.shape:
            raise InputError(f"data: {files.labels[image.name]} is not on the grid of {files.images[image.name]}")
        label_map = result.label_map_on(image.name)
        metrics[image.name] = evaluate_labels(label_map, truth.data[0].numpy().astype(np.int64),
                                              tuple(reversed(image.grid.spacing)), labels)
    return metrics


def _prepare(out: Path, record: dict, force: bool) -> None:
    """Create ``out``, or resume in it when it holds a run with the same settings (else refuse)."""
    index = out / "experiment.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder")
    if index.exists() and not force:
        previous = json.loads(index.read_text())
        # settings added since that run was made count as their defaults there (it ran without them)
        previous["settings"] = {**asdict(ExperimentSettings()), **previous.get("settings", {})}
        if {k: previous.get(k) for k in record} != record:
            raise InputError(f"out: {out} holds a run with other settings or data ({index.name}); "
                             f"nothing was changed (use another `out`, or `force` to redo it)")
    elif out.is_dir() and any(out.iterdir()) and not index.exists() and not force:
        raise InputError(f"out: {out} exists, is not empty and is not an experiment folder (use `force`)")
    (out / "patients").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    write_json(index, {"format": EXPERIMENT_FORMAT, **record})


def run_mscmr(data, out, settings: ExperimentSettings, patients: Optional[List[int]] = None, atlas_data=None,
              force: bool = False, progress: bool = True, lge_data=None) -> dict:
    """Run the experiment (see the module notes); returns the summary written to ``out/summary.json``.

    ``lge_data``: a folder whose ``patientN_LGE.nii.gz`` and ``patientN_LGE_manual.nii.gz`` replace the
    targets' LGE image and labels (e.g. ``mscmr_full``, the uncropped LGE); the atlases are still
    built from ``data`` (or ``atlas_data``), so they are the same as without it.
    """
    manifest = Manifest.load("mscmr19")
    sequences = [manifest.canonical_sequence(s) for s in settings.sequences]
    sequences = ["LGE"] + [s for s in sequences if s != "LGE"]
    settings = ExperimentSettings(**{**asdict(settings), "sequences": sequences})
    parse_subtypes(settings.subtypes, sequences, manifest.labels.names)  # a typo fails now, not after a patient
    if settings.pathology and not cardiac_pathology_subtypes(sequences):
        raise InputError(f"pathology: none of the sequences {', '.join(sequences)} shows scar (LGE) or oedema (T2)")
    targets = scan(manifest, data, patients, ["LGE"], ["LGE"])
    if targets.problems:
        raise InputError("data: " + "; ".join(targets.problems[:5])
                         + (f" (and {len(targets.problems) - 5} more)" if len(targets.problems) > 5 else ""))
    # a patient without one of the sequences (MS-CMRSeg's patients 21 and 25 have no T2) is skipped, and said so
    skipped = {n: "no " + ", ".join(f"{s} image ({expected_names(manifest, s, n, 'image')})" for s in missing)
               for n in sorted(patients or targets.patients)
               for missing in [[s for s in sequences if s not in targets.patients[n].images]] if missing}
    for n, reason in skipped.items():
        log.warning("patient %d skipped: %s", n, reason)
    patients = [n for n in sorted(patients or targets.patients) if n not in skipped]
    if not patients:
        raise InputError(f"data: no patient in {data} has every sequence of `sequences` ({', '.join(sequences)})")
    atlas_scan = scan(manifest, atlas_data, None, [], ["LGE"]) if atlas_data is not None else targets
    cases = dict(targets.patients)  # what each target is segmented and evaluated on
    if lge_data is not None:
        replaced = scan(manifest, lge_data, patients, ["LGE"], ["LGE"], argname="lge_data")
        if replaced.problems:
            raise InputError("lge_data: " + "; ".join(replaced.problems[:5])
                             + (f" (and {len(replaced.problems) - 5} more)" if len(replaced.problems) > 5 else ""))
        cases = {n: replace(f, images={**f.images, "LGE": replaced.patients[n].images["LGE"]},
                            labels={**f.labels, "LGE": replaced.patients[n].labels["LGE"]}) for n, f in cases.items()
                 if n in patients}
    if atlas_scan.problems:
        raise InputError("atlas_data: " + "; ".join(atlas_scan.problems[:5]))
    pool = {n: f.labels["LGE"] for n, f in atlas_scan.patients.items() if "LGE" in f.labels}
    # templates of every sequence the atlas patients have (not only the targets'): runs on other sequences
    # of the same patients then share one atlas per target
    pool_images = {s: by_patient for s in manifest.sequences
                   for by_patient in [{n: f.images[s] for n, f in atlas_scan.patients.items()
                                       if n in pool and s in f.images}] if by_patient}
    entries = [AtlasEntry(f"patient{n}", "LGE", f.images["LGE"], f.labels["LGE"])
               for n, f in sorted(atlas_scan.patients.items()) if n in pool and "LGE" in f.images]
    out = Path(out)
    record = {"data": str(Path(data).resolve()), "atlas_data": str(Path(atlas_data).resolve()) if atlas_data else None,
              "settings": asdict(settings)}
    if lge_data is not None:  # (absent otherwise: earlier runs' folders resume as they were)
        record["lge_data"] = str(Path(lge_data).resolve())
    if settings.prior == "multi-atlas-fit":
        # how the second fit's prior is made (its fusion changed in 0.23.0 and 0.24.0): a folder of another way is
        # not resumed, so that no table mixes the two; one made before 0.23.0 has none and is refused too
        record["fit_guided"] = asdict(FitGuidedSettings())
    _prepare(out, record, force)
    device = resolve_device(settings.device)
    fold_of = {p: i % settings.folds for i, p in enumerate(patients)} if settings.folds else None
    if fold_of is not None and atlas_data is not None:
        raise InputError("atlas_data: with `folds`, each fold's atlas comes from the other folds' patients")
    kinds = [kind for kind, methods in (("bayes", BAYES_METHODS), ("vae-seg", VAE_METHODS))
             if set(methods) & set(settings.methods)]
    from mvmm.nets.model_dir import load_model  # here: the networks' modules load only for an experiment

    given, models, training = {}, {}, {}
    if settings.model is not None:
        loaded = load_model(settings.model, device, argname="model")
        given = {loaded.config.kind: loaded}
        for kind in kinds:
            if kind not in given:
                raise InputError(f"model: {settings.model} is a {loaded.config.kind!r} model; the methods "
                                 f"{', '.join(m for m in settings.methods if m.startswith(kind))} need a {kind!r} "
                                 f"model (or `folds`)")
            _require_labels(given[kind].config.labels, manifest.labels, f"model: {settings.model}")
    vae_prior = None
    if settings.vae_prior is not None:
        vae_prior = load_model(settings.vae_prior, device, argname="vae_prior")
        vae_prior.config.require("prior", vae_prior.path, argname="vae_prior")
        _require_labels(vae_prior.config.labels, manifest.labels, f"vae_prior: {settings.vae_prior}")
    for target in tqdm(patients, desc="MS-CMRSeg", unit="patient", disable=not progress):
        done = out / "patients" / f"patient{target}.json"
        if done.exists() and not force:
            continue
        if fold_of is not None:
            own = {n: p for n, p in pool.items() if n in fold_of and fold_of[n] != fold_of[target]}
        else:
            own = {n: p for n, p in pool.items() if atlas_data is not None or n != target}
        if len(own) < 2:
            raise InputError(f"atlas_data: patient {target} needs at least two atlas patients with LGE labels, "
                             f"found {sorted(own)}")
        atlas, build_seconds = None, 0.0
        if settings.prior != "multi-atlas":
            own_images = {s: {n: p for n, p in by_patient.items() if n in own} for s, by_patient in pool_images.items()}
            atlas, build_seconds = _atlas_for(own, own_images, out, device, progress, settings.atlas_register)
        if fold_of is not None and kinds:
            fold = fold_of[target]
            if fold not in models:
                models[fold] = _fold_models(fold, sorted(own), kinds, targets, atlas, vae_prior, manifest.labels,
                                            settings, out, progress)
            given = models[fold]
        own_entries = atlas_set_of(entries, own, atlas_data is not None)
        result = run_patient(target, cases[target], atlas, settings, own_entries, progress, given)
        comparison_figure(out / "figures" / f"patient{target}.png", result["image"],
                          {"manual": result["truth"], **{m: result["maps"][m] for m in settings.methods}}, manifest.labels,
                          title=f"MS-CMRSeg patient {target}, LGE")
        write_json(done, {"patient": target, "atlas_patients": sorted(own), "atlas_build_seconds": build_seconds,
                          "fold": None if fold_of is None else fold_of[target],
                          "metrics": result["metrics"], "native_metrics": result["native_metrics"],
                          "pathology": result["pathology"],
                          "seconds": result["seconds"], "em_all_timings_s": result["em_all_timings_s"],
                          "network_timings_s": result["network_timings_s"], "quality": result["quality"],
                          "atlas_set": result["atlas_set"],
                          "atlas_set_fit": result["atlas_set_fit"]})
        log.info("patient %d: em-all Dice %s", target,
                 {k: round(v["dice"], 3) for k, v in result["metrics"]["em-all"].items()})
    if fold_of is not None and kinds:
        # the Bayesian CNN's reports as before (foldF); the fold's prior (priorF) and the network on it (vae-segF)
        training = {f"{stem}{f}": json.loads(p.read_text()) for stem in ("fold", "prior", "vae-seg")
                    for f in range(settings.folds)
                    for p in [out / "models" / f"{stem}{f}.json"] if p.exists()}
    extra = {"training": training} if training else {}
    if skipped:
        extra["skipped"] = {str(n): reason for n, reason in skipped.items()}
    return write_summary(out, patients, settings.methods, manifest.labels, extra)


def _label_names(labels) -> str:
    """``"Myo=200,LV=500,RV=600"``: the foreground classes as a prior's ``label_names``."""
    return ",".join(f"{name}={value}" for name, value in labels.foreground)


def _require_labels(labels, expected, what: str) -> None:
    """A network's classes must be MS-CMRSeg's, with its values: the label maps it yields are scored as they are."""
    if labels.as_dict() != expected.as_dict():
        raise InputError(f"{what} has the classes {labels.as_dict()}; the experiment scores MS-CMRSeg's "
                         f"{expected.as_dict()} (train it naming their values first, e.g. the prior's label_names "
                         f"{_label_names(expected)},RV=1,Myo=2,LV=3)")


def _fold_models(fold: int, train_patients: List[int], kinds: List[str], targets, atlas: Atlas, vae_prior, labels,
                 settings: ExperimentSettings, out: Path, progress: bool) -> dict:
    """The networks of ``fold`` by kind (those of ``kinds``), trained on ``train_patients``' images —
    a finished one is loaded, an interrupted one resumed — in ``out/models``: ``foldF`` (the Bayesian
    CNN, with their ``atlas``; with ``settings.network_labels`` their LGE labels too), ``priorF`` (the
    anatomical prior of their LGE labels, unless ``vae_prior`` is given) and ``vae-segF``; each with its
    report beside it (``NAME.json``)."""
    from mvmm.core.settings import BayesNetSettings, PriorVaeSettings, TrainingSettings, VaeSegSettings
    from mvmm.nets.data import SubjectRow
    from mvmm.nets.model_dir import WEIGHTS, load_model
    from mvmm.training import train_bayes, train_prior, train_vae_seg

    device = resolve_device(settings.device)
    rows = [SubjectRow(f"patient{n}", {s: targets.patients[n].images[s] for s in settings.sequences},
                       targets.patients[n].labels["LGE"] if settings.network_labels else None) for n in train_patients]
    training = TrainingSettings(epochs=settings.epochs, seed=settings.seed)

    def trained(name: str, train) -> Path:
        folder, report = out / "models" / name, out / "models" / f"{name}.json"
        if not (folder / WEIGHTS).exists():
            resume = (folder / "checkpoint.pt").exists()
            result = train(folder, resume)
            # the training's time over all its runs: one interrupted before it wrote a report is counted too
            write_json(report, {"patients": train_patients, "epochs": result["epochs"],
                                "final_loss": result["final_loss"], "seconds": result["epoch_seconds"],
                                **({"labelled": result["labelled"]} if "labelled" in result else {})})
        return folder

    models = {}
    if "bayes" in kinds:
        network = BayesNetSettings(subtypes=list(settings.subtypes), proportions=settings.proportions)
        labelled = [r.name for r in rows] if settings.network_labels else ()
        models["bayes"] = load_model(trained(f"fold{fold}", lambda folder, resume: train_bayes(
            rows, settings.sequences, atlas, folder, network, training, settings.device, resume=resume, force=True,
            progress=progress, labelled=labelled)), device)
    if "vae-seg" in kinds:
        prior = vae_prior
        if prior is None:
            maps = [targets.patients[n].labels["LGE"] for n in train_patients]
            prior = trained(f"prior{fold}", lambda folder, resume: train_prior(
                maps, _label_names(labels), folder, PriorVaeSettings(),
                TrainingSettings(epochs=settings.prior_epochs, batch_size=4, seed=settings.seed), settings.device,
                resume=resume, force=True, progress=progress))
        unlabelled = [replace(r, labels=None) for r in rows]  # the network on the prior learns from images alone
        models["vae-seg"] = load_model(trained(f"vae-seg{fold}", lambda folder, resume: train_vae_seg(
            unlabelled, settings.sequences, prior, folder, VaeSegSettings(subtypes=list(settings.subtypes)),
            training, settings.device, resume=resume, force=True, progress=progress)), device)
    return models
