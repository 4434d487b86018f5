"""From image files to a model directory: the Python API behind ``mvmm train bayes``, ``regnet``, ``acwe``,
``prior`` and ``vae-seg``.

    rows = subjects_from_manifest("mscmr19", "data/mscmr", range(1, 21), ["LGE", "C0"])
    train_bayes(rows, ["LGE", "C0"], ["atlas.nii.gz"], "models/bayes", BayesNetSettings(), TrainingSettings())

Each subject is read, its atlas placed as ``mvmm segment`` places it, and resampled once onto its
network grid (:mod:`mvmm.nets.data`); the networks are trained on the images alone — no label of a
training subject is read — except the prior VAE (label maps alone, :func:`train_prior`) and the
labelled subjects of the Bayesian CNN and the Chan–Vese CNN when they are told of some
(``labelled``: semi-supervised, :func:`train_bayes`, :func:`train_acwe`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError
from mvmm.core.outputs import check_output_dir
from mvmm.core.settings import (AcweNetSettings, BayesNetSettings, PriorVaeSettings, RegNetSettings, TrainingSettings,
                                VaeSegSettings)
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet, parse_label_names
from mvmm.data.subject import Subject
from mvmm.mixture.subtypes import parse_subtypes
from mvmm.nets.data import SubjectRow, case_labels, prepare_case, prepare_label_case, prepare_pair
from mvmm.nets.model_dir import CHECKPOINT, CURVE, ModelConfig, build_network, read_config, write_model_files
from mvmm.nets.train import seeded_network, train_network
from mvmm.report import loss_figure

log = logging.getLogger(__name__)
CURVE_EVERY = 5  # epochs between redraws of loss.png during training


def placed_subject(images: List[Image], atlas: Atlas) -> Subject:
    """The images with the atlas as ``load_subject`` places it (an ``axes`` atlas on the reference's heart frame)."""
    return Subject(images, atlas=atlas.placed_for(images[0].grid))


def model_subtypes(network: BayesNetSettings, sequences: Sequence[str], atlas: Atlas) -> np.ndarray:
    """Subtype counts ``[N, K]``: ``network.subtypes`` over one per tissue, ``background_subtypes`` for the background."""
    base = np.ones((len(sequences), len(atlas.labels)), dtype=np.int64)
    base[:, atlas.labels.background_index] = network.background_subtypes
    return parse_subtypes(network.subtypes, list(sequences), atlas.labels.names, default=base)


def train_bayes(rows: Sequence[SubjectRow], sequences: Sequence[str], atlas: Union[Atlas, Sequence], out,
                network: BayesNetSettings, training: TrainingSettings, device: str = "auto", resume: bool = False,
                force: bool = False, progress: bool = True, labelled: Sequence[str] = ()) -> dict:
    """Train the Bayesian segmentation CNN on ``rows`` (unlabelled images) into model directory ``out``.

    Unsupervised (Dalca et al. 2019): the loss reads the images only. Semi-supervised: the subjects
    named in ``labelled`` also contribute the cross-entropy of the model's posterior on their label
    maps (``SubjectRow.labels``, values as the atlas's), weighted by ``network.label_weight``.

    Parameters
    ----------
    rows : sequence of SubjectRow
        Training subjects, an image per sequence each (:func:`mvmm.nets.data.subjects_from_csv`,
        :func:`~mvmm.nets.data.subjects_from_manifest`).
    sequences : sequence of str
        Image names in the network's input order; the first is the reference (its grid places the
        network grid).
    atlas : Atlas or sequence of path
        The atlas (a probability atlas, e.g. from ``mvmm atlas build``, or label maps).
    out : path
        The model directory (:mod:`mvmm.nets.model_dir`).
    network, training : BayesNetSettings, TrainingSettings
    resume : bool
        Continue the run in ``out`` (its config wins; ``training.epochs`` may be raised).
    force : bool
        Replace a non-empty ``out`` that is not resumed.
    labelled : sequence of str
        Names of the rows whose label maps are read (empty: unsupervised).

    Returns
    -------
    dict
        ``epochs``, ``final_loss``, ``seconds`` (this call's training), ``epoch_seconds`` (all its epochs',
        a resumed run's earlier ones included), ``subjects``, ``out``, ``labelled``.
    """
    out = Path(out)
    sequences = list(sequences)
    if not rows:
        raise InputError("data: no training subjects")
    labelled = _checked_labelled(rows, labelled)
    network, training = _run_settings(out, "bayes", sequences, network, training, resume, force)
    torch_device = resolve_device(device)
    if not isinstance(atlas, Atlas):
        atlas = Atlas.read(list(atlas))
    network = network.resolved(atlas.grid.ndim)
    counts = model_subtypes(network, sequences, atlas)
    cases = []
    for row in tqdm(rows, desc="reading subjects", unit="subject", disable=not progress, leave=False):
        images = _row_images(row, sequences)
        case = prepare_case(placed_subject(images, atlas), network)
        case.name = row.name
        cases.append(_with_labels(case, row, labelled, atlas.labels))
    config = ModelConfig("bayes", network, sequences, counts, atlas.labels, training, [r.name for r in rows],
                         labelled=labelled)
    title = f"mvmm train bayes: {', '.join(sequences)}, {len(rows)} subjects" + (
        f" ({len(labelled)} labelled)" if labelled else "")
    result = _train(config, cases, out, torch_device, resume, progress, rows, title, atlas)
    return {**result, "labelled": labelled}


def _train(config: ModelConfig, cases, out: Path, device, resume: bool, progress: bool, rows, title: str,
           atlas: Optional[Atlas] = None, build=None, **curve) -> dict:
    """Write the model files (a new run), build the seeded network (``build``, default from ``config``),
    train it on ``cases`` with its loss curve (``title``; ``curve``: :func:`mvmm.report.loss_figure`'s
    labels) redrawn every few epochs; returns the run's report."""
    training, network = config.training, config.network
    if not resume:
        write_model_files(out, config, atlas)
    net = seeded_network(build or (lambda: build_network(config)), training.seed)

    def draw(history):
        if len(history) % CURVE_EVERY == 0 or len(history) == training.epochs:
            loss_figure(out / CURVE, history, title=title, **curve)

    started = time.perf_counter()
    history = train_network(net, cases, training, out, device, resume=resume, progress=progress, on_epoch=draw)
    seconds = time.perf_counter() - started
    log.info("trained %s for %d epochs in %.0f s (loss %.4f)", out, len(history), seconds, history[-1]["loss"])
    # every epoch's time, a resumed run's earlier epochs included (they are in the checkpointed log; this
    # call's ``seconds`` only has its own)
    epoch_seconds = sum(h["seconds"] for h in history)
    return {"epochs": len(history), "final_loss": history[-1]["loss"], "seconds": seconds,
            "epoch_seconds": epoch_seconds, "subjects": [r.name for r in rows], "out": str(out),
            "network": asdict(network)}


def _run_settings(out: Path, kind: str, images: List[str], network, training: TrainingSettings, resume: bool,
                  force: bool):
    """``(network, training)`` of a run into ``out``: a resumed run's own (its epochs raised to
    ``training.epochs``), else those given, ``out`` checked to be free (or ``force``)."""
    if resume:
        config = _resumed_config(out, kind, images)
        config.training.epochs = training.epochs
        return config.network, config.training
    check_output_dir(out, force)
    return network, training


def _checked_labelled(rows: Sequence[SubjectRow], labelled: Sequence[str]) -> List[str]:
    """``labelled`` as a list, each a training subject's name (else InputError)."""
    labelled = list(labelled)
    names = {r.name for r in rows}
    unknown = [n for n in labelled if n not in names]
    if unknown:
        raise InputError(f"labelled: {unknown} are not training subjects")
    return labelled


def _with_labels(case, row: SubjectRow, labelled: Sequence[str], labels: LabelSet):
    """``case`` with its label map as class indices on its network grid when ``row`` is labelled, −1
    everywhere when other subjects are (a batch mixes both), unchanged when none is."""
    if not labelled:
        return case
    if row.name in labelled:
        if row.labels is None:
            raise InputError(f"labelled: subject {row.name} has no label map")
        case.labels = case_labels(Image.read(row.labels, f"{row.name} labels", argname="labelled"),
                                  case.grid, labels, argname="labelled")
    else:
        case.labels = torch.full(case.region.shape, -1, dtype=torch.long)
    return case


def _row_images(row: SubjectRow, sequences: Sequence[str]) -> List[Image]:
    """The images of one training subject, one per sequence (a missing one named)."""
    missing = [s for s in sequences if s not in row.images]
    if missing:
        raise InputError(f"data: subject {row.name} has no {', '.join(missing)} image")
    return [Image.read(row.images[s], s, argname="data") for s in sequences]


def _resumed_config(out: Path, kind: str, images: List[str]):
    if not (out / CHECKPOINT).exists():
        raise InputError(f"resume: {out} holds no {CHECKPOINT} to resume from")
    config = read_config(out)
    config.require(kind, out)
    if config.images != images:
        raise InputError(f"resume: {out} was trained on {config.images}, not {images}")
    return config


def train_regnet(rows: Sequence[SubjectRow], fixed: str, moving: str, out, network: RegNetSettings,
                 training: TrainingSettings, device: str = "auto", resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    """Train the registration network on the pairs (``fixed``, ``moving``) of sequences of ``rows``
    (unlabelled: only the images are read) into model directory ``out``.

    The network learns the transform from the fixed image's world into the moving image's, on the
    fixed image's network grid (:mod:`mvmm.nets.regnet`); ``mvmm register --model`` applies it.
    Other parameters as :func:`train_bayes`.
    """
    out = Path(out)
    if not rows:
        raise InputError("data: no training subjects")
    network, training = _run_settings(out, "regnet", [fixed, moving], network, training, resume, force)
    torch_device = resolve_device(device)
    cases = []
    for row in tqdm(rows, desc="reading pairs", unit="pair", disable=not progress, leave=False):
        pair = _row_images(row, (fixed, moving))
        network = network.resolved(pair[0].grid.ndim)
        case = prepare_pair(*pair, network)
        case.name = row.name
        cases.append(case)
    config = ModelConfig("regnet", network, [fixed, moving], None, None, training, [r.name for r in rows])
    return _train(config, cases, out, torch_device, resume, progress, rows,
                  f"mvmm train regnet: {moving} → {fixed}, {len(rows)} pairs",
                  data_label=f"dissimilarity (−{network.metric.upper()})")


def unnamed_classes(n_classes: int) -> LabelSet:
    """The classes of a Chan–Vese model without atlas or labels: phases by increasing mean intensity of
    the first image, ``dark``/``bright`` for two, else ``phase1`` … ``phaseK`` (label values 0 … K − 1)."""
    names = ("dark", "bright") if n_classes == 2 else tuple(f"phase{k + 1}" for k in range(n_classes))
    return LabelSet(names, tuple(range(n_classes)))


def train_acwe(rows: Sequence[SubjectRow], sequences: Sequence[str], out, network: AcweNetSettings,
               training: TrainingSettings, atlas: Union[Atlas, Sequence, None] = None,
               labels: Optional[LabelSet] = None, labelled: Sequence[str] = (), device: str = "auto",
               resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train the Chan–Vese CNN (:mod:`mvmm.nets.acwe`) on ``rows`` into model directory ``out``.

    Unsupervised: the energy reads the images only. Semi-supervised: the subjects named in
    ``labelled`` also contribute a cross-entropy on their label maps (``SubjectRow.labels``).

    Parameters
    ----------
    rows, sequences, out, training, device, resume, force, progress
        As :func:`train_bayes`.
    network : AcweNetSettings
        ``classes`` (K), ``length_weight``, ``variances``, ``label_weight``.
    atlas : Atlas or sequence of path, optional
        The atlas, placed as ``mvmm segment`` places it: the region of interest and an input; with
        ``network.classes`` None or its class count, also a prior term of the energy, and it names
        the classes; with another K, it only bounds the region of unnamed phases.
    labels : LabelSet, optional
        The classes of the label maps (values → names) when there is no atlas; with one, its labels.
    labelled : sequence of str
        Names of the rows whose label maps are read.

    Returns
    -------
    dict
        As :func:`train_bayes`, plus ``classes`` (name → value) and ``labelled``.
    """
    out = Path(out)
    sequences = list(sequences)
    if not rows:
        raise InputError("data: no training subjects")
    network, training = _run_settings(out, "acwe", sequences, network, training, resume, force)
    torch_device = resolve_device(device)
    if atlas is not None and not isinstance(atlas, Atlas):
        atlas = Atlas.read(list(atlas))
    labelled = _checked_labelled(rows, labelled)
    # the atlas names the classes unless K differs from its count (then it only bounds the region)
    atlas_names = atlas is not None and network.classes in (None, len(atlas.labels))
    if atlas_names:
        labels = atlas.labels
    elif labelled and atlas is not None:
        raise InputError(f"classes: labelled subjects are scored against the atlas's classes {atlas.labels.as_dict()}; "
                         f"K = {network.classes} differs")
    elif labelled and labels is None:
        raise InputError("labels: labelled subjects need the label set of their maps (or an atlas)")
    named = atlas_names or bool(labelled)
    if named:
        if network.classes is not None and network.classes != len(labels):
            raise InputError(f"classes: the labels {labels.as_dict()} have {len(labels)} classes, not {network.classes}")
    else:
        labels = unnamed_classes(network.classes or 2)
    network = replace(network, classes=len(labels))
    cases = []
    for row in tqdm(rows, desc="reading subjects", unit="subject", disable=not progress, leave=False):
        images = _row_images(row, sequences)
        network = network.resolved(images[0].grid.ndim)  # the same for every subject (checked by the grid)
        subject = placed_subject(images, atlas) if atlas is not None else Subject(images)
        case = prepare_case(subject, network, require_atlas=False)
        case.name = row.name
        cases.append(_with_labels(case, row, labelled, labels))
    config = ModelConfig("acwe", network, sequences, None, labels, training, [r.name for r in rows],
                         with_atlas=atlas is not None, class_order="named" if named else "intensity",
                         labelled=labelled)
    title = f"mvmm train acwe: {', '.join(sequences)}, {len(rows)} subjects" + (
        f" ({len(labelled)} labelled)" if labelled else "")
    result = _train(config, cases, out, torch_device, resume, progress, rows, title, atlas,
                    data_label="region energy / voxel", second=("length", "mean ½ Σ|∇P| (mm⁻¹)"))
    return {**result, "classes": labels.as_dict(), "labelled": labelled}


def train_prior(maps: Sequence, label_names: str, out, network: PriorVaeSettings, training: TrainingSettings,
                device: str = "auto", resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train the anatomical-prior VAE (:mod:`mvmm.nets.prior`) on label maps alone into ``out``.

    Parameters
    ----------
    maps : sequence of path
        Label maps (any data set, sequence and geometry the headers describe).
    label_names : str
        ``NAME=VALUE,...`` naming the maps' values (:func:`mvmm.data.labels.parse_label_names`), e.g.
        ``"RV=1,Myo=2,LV=3"`` for ACDC; the model's classes are ``bg`` and these names, and label
        maps it yields hold each name's first value.
    network : PriorVaeSettings
    training, device, resume, force, progress
        As :func:`train_bayes` (``training.smoothness`` does not apply).

    Returns
    -------
    dict
        ``epochs``, ``final_loss``, ``seconds``, ``epoch_seconds`` (as :func:`train_bayes`), ``subjects`` (the
        maps), ``out``, ``network``, ``classes``.
    """
    out = Path(out)
    maps = [Path(m) for m in maps]
    if not maps:
        raise InputError("maps: no label maps")
    labels, index_of = parse_label_names(label_names)
    network, training = _run_settings(out, "prior", [], network, training, resume, force)
    torch_device = resolve_device(device)
    cases = []
    for path in tqdm(maps, desc="reading label maps", unit="map", disable=not progress, leave=False):
        image = Image.read(path, path.name, argname="maps")
        network = network.resolved(image.grid.ndim)
        cases.append(prepare_label_case(image, network, index_of))
    named = {name: sorted(v for v, k in index_of.items() if k == i) for i, name in enumerate(labels.names)}
    config = ModelConfig("prior", network, [], None, labels, training, [str(m) for m in maps], label_names=named)
    result = _train(config, cases, out, torch_device, resume, progress, [SubjectRow(str(m), {}) for m in maps],
                    f"mvmm train prior: {len(maps)} label maps", data_label="cross-entropy / voxel",
                    second=("kl", "KL(q(z|s) ‖ N(0, I)) / voxel"))
    return {**result, "classes": labels.as_dict()}


def train_vae_seg(rows: Sequence[SubjectRow], sequences: Sequence[str], prior, out, network: VaeSegSettings,
                  training: TrainingSettings, device: str = "auto", resume: bool = False, force: bool = False,
                  progress: bool = True) -> dict:
    """Train the segmentation network on a frozen anatomical prior (:mod:`mvmm.nets.vae_seg`) on
    ``rows`` (unlabelled images) into ``out``.

    Parameters
    ----------
    rows, sequences, out, training, device, resume, force, progress
        As :func:`train_bayes`.
    prior : path or LoadedModel
        A ``prior`` model directory (:func:`train_prior`); its weights are copied into the new model,
        which is self-contained.
    network : VaeSegSettings
        Its grid is the prior's.
    """
    from mvmm.nets.model_dir import LoadedModel, load_model

    out = Path(out)
    sequences = list(sequences)
    if not rows:
        raise InputError("data: no training subjects")
    torch_device = resolve_device(device)
    if not isinstance(prior, LoadedModel):
        prior = load_model(prior, argname="prior")
    prior.config.require("prior", prior.path, argname="prior")
    network, training = _run_settings(out, "vae-seg", sequences, network, training, resume, force)
    prior_settings = prior.config.network
    labels = prior.config.labels
    network = replace(network, grid_size=prior_settings.grid_size, grid_spacing=prior_settings.grid_spacing)
    network = network.resolved(len(prior_settings.grid_size))
    factor = 2 ** len(network.channels)
    if any(s % factor for s in network.grid_size):
        raise InputError(f"VaeSegSettings.channels: the prior's grid {network.grid_size} is not a multiple of "
                         f"{factor} (the encoder halves it {len(network.channels)} times)")
    base = np.ones((len(sequences), len(labels)), dtype=np.int64)
    base[:, labels.background_index] = network.background_subtypes
    counts = parse_subtypes(network.subtypes, sequences, labels.names, default=base)
    cases = []
    for row in tqdm(rows, desc="reading subjects", unit="subject", disable=not progress, leave=False):
        images = _row_images(row, sequences)
        case = prepare_case(Subject(images), network, require_atlas=False)
        case.name = row.name
        cases.append(case)
    config = ModelConfig("vae-seg", network, sequences, counts, labels, training, [r.name for r in rows],
                         prior=prior_settings)
    def build():
        net = build_network(config)
        net.prior.load_state_dict(prior.net.state_dict())
        return net

    result = _train(config, cases, out, torch_device, resume, progress, rows,
                    f"mvmm train vae-seg: {', '.join(sequences)}, {len(rows)} subjects", build=build,
                    second=("kl", "KL(q(z|I) ‖ N(0, I)) / voxel"))
    return {**result, "prior": str(prior.path)}
