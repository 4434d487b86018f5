"""From image files to a model directory: the Python API behind ``mvmm train bayes`` and ``mvmm train regnet``.

    rows = subjects_from_manifest("mscmr19", "data/mscmr", range(1, 21), ["LGE", "C0"])
    train_bayes(rows, ["LGE", "C0"], ["atlas.nii.gz"], "models/bayes", BayesNetSettings(), TrainingSettings())

Each subject is read, its atlas placed as ``mvmm segment`` places it, and resampled once onto its
network grid (:mod:`mvmm.nets.data`); the network is trained on the images alone — no label of a
training subject is read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError
from mvmm.core.outputs import check_output_dir
from mvmm.core.settings import BayesNetSettings, RegNetSettings, TrainingSettings
from mvmm.data.atlas import Atlas
from mvmm.data.image import Image
from mvmm.data.subject import Subject
from mvmm.mixture.subtypes import parse_subtypes
from mvmm.nets.data import SubjectRow, prepare_case, prepare_pair
from mvmm.nets.model_dir import CHECKPOINT, CURVE, ModelConfig, build_network, read_config, write_model_files
from mvmm.nets.train import seeded_network, train_network
from mvmm.report import loss_figure

log = logging.getLogger(__name__)
CURVE_EVERY = 5  # epochs between redraws of loss.png during training


def placed_subject(images: List[Image], atlas: Atlas) -> Subject:
    """The images with the atlas as ``load_subject`` places it (an ``axes`` atlas on the reference's heart frame)."""
    if atlas.frame == "axes":
        atlas = atlas.placed_on(images[0].grid)
    return Subject(images, atlas=atlas)


def model_subtypes(network: BayesNetSettings, sequences: Sequence[str], atlas: Atlas) -> np.ndarray:
    """Subtype counts ``[N, K]``: ``network.subtypes`` over one per tissue, ``background_subtypes`` for the background."""
    base = np.ones((len(sequences), len(atlas.labels)), dtype=np.int64)
    base[:, atlas.labels.background_index] = network.background_subtypes
    return parse_subtypes(network.subtypes, list(sequences), atlas.labels.names, default=base)


def train_bayes(rows: Sequence[SubjectRow], sequences: Sequence[str], atlas: Union[Atlas, Sequence], out,
                network: BayesNetSettings, training: TrainingSettings, device: str = "auto", resume: bool = False,
                force: bool = False, progress: bool = True) -> dict:
    """Train the Bayesian segmentation CNN on ``rows`` (unlabelled images) into model directory ``out``.

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

    Returns
    -------
    dict
        ``epochs``, ``final_loss``, ``seconds`` (this call's training), ``subjects``, ``out``.
    """
    out = Path(out)
    sequences = list(sequences)
    if not rows:
        raise InputError("data: no training subjects")
    if resume:
        config = _resumed_config(out, "bayes", sequences)
        config.training.epochs = training.epochs
        network, training = config.network, config.training
    else:
        check_output_dir(out, force)
    torch_device = resolve_device(device)
    if not isinstance(atlas, Atlas):
        atlas = Atlas.read(list(atlas))
    network = network.resolved(atlas.grid.ndim)
    counts = model_subtypes(network, sequences, atlas)
    cases = []
    for row in tqdm(rows, desc="reading subjects", unit="subject", disable=not progress, leave=False):
        missing = [s for s in sequences if s not in row.images]
        if missing:
            raise InputError(f"data: subject {row.name} has no {', '.join(missing)} image")
        images = [Image.read(row.images[s], s, argname="data") for s in sequences]
        case = prepare_case(placed_subject(images, atlas), network)
        case.name = row.name
        cases.append(case)
    config = ModelConfig("bayes", network, sequences, counts, atlas.labels, training, [r.name for r in rows])
    if not resume:
        write_model_files(out, config, atlas)
    net = seeded_network(lambda: build_network(config), training.seed)

    def draw(history):
        if len(history) % CURVE_EVERY == 0 or len(history) == training.epochs:
            loss_figure(out / CURVE, history, title=f"mvmm train bayes: {', '.join(sequences)}, {len(rows)} subjects")

    return _train(net, cases, training, out, torch_device, resume, progress, draw, rows, network)


def _train(net, cases, training, out, device, resume, progress, draw, rows, network) -> dict:
    started = time.perf_counter()
    history = train_network(net, cases, training, out, device, resume=resume, progress=progress, on_epoch=draw)
    seconds = time.perf_counter() - started
    log.info("trained %s for %d epochs in %.0f s (loss %.4f)", out, len(history), seconds, history[-1]["loss"])
    return {"epochs": len(history), "final_loss": history[-1]["loss"], "seconds": seconds,
            "subjects": [r.name for r in rows], "out": str(out), "network": asdict(network)}


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
    if resume:
        config = _resumed_config(out, "regnet", [fixed, moving])
        config.training.epochs = training.epochs
        network, training = config.network, config.training
    else:
        check_output_dir(out, force)
    torch_device = resolve_device(device)
    cases = []
    for row in tqdm(rows, desc="reading pairs", unit="pair", disable=not progress, leave=False):
        missing = [s for s in (fixed, moving) if s not in row.images]
        if missing:
            raise InputError(f"data: subject {row.name} has no {', '.join(missing)} image")
        pair = [Image.read(row.images[s], s, argname="data") for s in (fixed, moving)]
        network = network.resolved(pair[0].grid.ndim)
        case = prepare_pair(*pair, network)
        case.name = row.name
        cases.append(case)
    config = ModelConfig("regnet", network, [fixed, moving], None, None, training, [r.name for r in rows])
    if not resume:
        write_model_files(out, config)
    net = seeded_network(lambda: build_network(config), training.seed)

    def draw(history):
        if len(history) % CURVE_EVERY == 0 or len(history) == training.epochs:
            loss_figure(out / CURVE, history, title=f"mvmm train regnet: {moving} → {fixed}, {len(rows)} pairs",
                        data_label=f"dissimilarity (−{network.metric.upper()})")

    return _train(net, cases, training, out, torch_device, resume, progress, draw, rows, network)
