"""Multi-atlas priors: labelled images of other subjects registered to the case, their labels fused.

The field's strongest label-free-at-test-time methods propagate several labelled atlases and fuse them
(Heckemann et al. 2006; Artaechevarria et al. 2009; ANTs joint label fusion). Here that fused map is
not the answer but the *prior* of the mixture model: a subject-specific probabilistic atlas, already
on the case's grid, which the model then refines with the case's own intensities.

For a case image I (the reference, e.g. the LGE) and atlas images A_i of the same sequence with label
maps L_i (an atlas set, :mod:`mvmm.data.atlas_set`):

1. each A_i is laid on I by their heart frames and field-of-view centres
   (:func:`mvmm.data.anatomy.frame_placement`), then registered to I rigidly and affinely
   (:class:`mvmm.register.PairwiseRegistration`, local NCC by default);
2. the ``size`` atlases with the best similarity after the affine step are kept (all by default);
3. each kept one goes on to the non-linear levels (FFD or SVF), and its image and one-hot labels are
   resampled onto I's grid (linear interpolation: partial volumes stay soft);
4. at every voxel x the labels are fused by a locally weighted vote,

       p_k(x) = Σ_i w_i(x) L_ik(x) / Σ_i w_i(x),   w_i(x) = exp(LNCC_i(x) / T) · [A_i covers x],

   LNCC_i(x) the normalised cross-correlation of I and the registered A_i in a Gaussian window of
   ``window_mm`` around x (so an atlas that matches the case *there* counts more), T the
   ``temperature``; voxels no atlas covers are background (``fusion`` "joint": joint label fusion's
   weights instead, :mod:`mvmm.joint_fusion`, which also count atlases that err alike once);
5. the fused map is smoothed by ``sigma_mm`` and renormalised: the prior ``π_kx`` of docs/model.md.

**Guided by a first fit** (:func:`fit_guided_prior`, ``mvmm segment --atlas-set-guide fit``): between patients
the images differ more than the anatomy (scar, nulling, coil shading), so instead of the images, each atlas's
one-hot label map, its anatomy's centre laid on the fit's, is registered to the posterior of a first fit of
the case with a probabilistic atlas — probability maps on both sides, their mean squared difference (SSD) as
the similarity, rigid → affine → FFD — and the warped labels are fused as in steps 4 and 5, each atlas's image
warped by its label map's transform (``fusion`` "joint", the default, or "local-ncc": the labels placed by the
anatomy, weighted where the atlas's image also looks like the case); an atlas set of another sequence (another
data set's label maps) votes equally. The prior so made has the atlases' real shapes where the first fit put the
anatomy; the model is then fitted again on it (:func:`mvmm.segment.refit_with_atlas_set`).

The registrations are independent: they run in worker processes (one torch thread each; by default
one per available core). A script that calls this with more than one worker needs the usual
``if __name__ == "__main__":`` guard around its entry point, as any user of spawned processes. The
workers start with the first call that needs them and serve every later one of the same process (an
experiment registers 20 label maps per method and patient; starting the processes, each importing
torch, took a few seconds every time); they end with the process, or at :func:`stop_workers`.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from mvmm.core.devices import available_cores
from mvmm.core.errors import InputError
from mvmm.core.settings import LINEAR_KINDS, FitGuidedSettings, MultiAtlasSettings  # noqa: F401 (re-exported)
from mvmm.data import io
from mvmm.data.anatomy import frame_placement
from mvmm.data.atlas import Atlas
from mvmm.data.atlas_set import AtlasEntry
from mvmm.data.image import Image
from mvmm.data.labels import LabelSet, label_values, one_hot, parse_label_names
from mvmm.joint_fusion import joint_fusion_weights, masked_window_mean, search_radius, searched_atlases
from mvmm.register import PairwiseRegistration
from mvmm.spatial.init import weighted_centre
from mvmm.spatial.regularizers import jacobian_statistics, warn_if_folded
from mvmm.spatial.transforms import map_grid
from mvmm.spatial.warp import sample_image

log = logging.getLogger(__name__)

ARGNAME = "atlas_set"
# a label map registered to a first fit whose foreground then overlaps the fit's by less Dice than this lost the
# anatomy (the SSD counts only where both maps are, so a map can slide to where both are background): it is
# left out of the fit-guided prior. A sanity floor, not a tuned value: on MS-CMRSeg (5-fold, 20 atlases per
# target) the kept maps ended at 0.70-0.93 (median 0.92); one map slid off (0.00) for two targets
MIN_FIT_AGREEMENT = 0.5


def read_labels(entry: AtlasEntry, case_grid, labels: LabelSet, image_grid=None) -> Image:
    """An atlas's one-hot labels ``[K, *S]`` (its values, or those its ``label_names`` names, as ``labels``' classes),
    laid on ``case_grid`` by :func:`mvmm.data.anatomy.frame_placement`; ``image_grid``: its image's grid, which the
    label map must share."""
    array, grid, _ = io.read_array(entry.labels, ARGNAME)
    if image_grid is not None and (not grid.same_geometry(image_grid) or array.shape != tuple(image_grid.shape)):
        raise InputError(f"{ARGNAME}: label map {entry.labels} is not on the grid of its image {entry.image}")
    if grid.ndim != case_grid.ndim:
        raise InputError(f"{ARGNAME}: {entry.labels} is {grid.ndim}D but the case is {case_grid.ndim}D")
    onehot = torch.from_numpy(one_hot(array, labels, entry.labels, ARGNAME, entry.label_names, "atlas_set_labels"))
    return Image(onehot, grid.moved(frame_placement(grid, case_grid)), f"{entry.name} labels", str(entry.labels))


def check_label_maps(entries: Sequence[AtlasEntry], labels: LabelSet) -> None:
    """InputError now, before any fit, for a label map of ``entries`` whose values are not ``labels``' (or not
    those its ``label_names`` names): the registrations that read them come after a first fit."""
    for entry in entries:
        array, _, _ = io.read_array(entry.labels, ARGNAME)
        one_hot(array, labels, entry.labels, ARGNAME, entry.label_names, "atlas_set_labels")


def read_atlas(entry: AtlasEntry, case_grid, labels: LabelSet) -> Tuple[Image, Image]:
    """An atlas image and its one-hot labels ``[K, *S]``, laid on ``case_grid`` by
    :func:`mvmm.data.anatomy.frame_placement` (one grid, moved; the voxels unchanged)."""
    image = Image.read(entry.image, entry.name, ARGNAME)
    image.check_intensities(ARGNAME)
    onehot = read_labels(entry, case_grid, labels, image_grid=image.grid)
    return Image(image.data, onehot.grid, entry.name, image.source), onehot


def _linear_kind(settings: MultiAtlasSettings) -> str:
    return settings.transform if settings.transform in LINEAR_KINDS else "affine"


def register_linear(case: Image, entry: AtlasEntry, settings: MultiAtlasSettings, labels: LabelSet,
                    device: str = "cpu") -> dict:
    """Step 1 for one atlas: its rigid → affine registration to ``case``.

    Returns ``{"linear": LinearTransform, "similarity": float}`` (similarity: minus the registration
    loss on its grid at the end, higher is better).
    """
    image, _ = read_atlas(entry, case.grid, labels)
    registration = PairwiseRegistration(case, image, settings.pairwise(_linear_kind(settings)), device=device)
    result = registration.run()
    return {"linear": registration.linear.cpu(), "similarity": -float(result.loss_after)}


def register_and_warp(case: Image, entry: AtlasEntry, settings: MultiAtlasSettings, labels: LabelSet,
                      linear, device: str = "cpu") -> dict:
    """Step 3 for one atlas: the non-linear levels from ``linear`` (none for a linear ``transform``),
    then the atlas image and labels on the case grid.

    Returns numpy arrays ``image [*S]``, ``labels [K, *S]``, ``inside [*S]`` (bool) and the
    deformation's Jacobian statistics (None for a linear transform).
    """
    device = torch.device(device)
    image, onehot = read_atlas(entry, case.grid, labels)
    registration = PairwiseRegistration(case, image, settings.pairwise(settings.transform), device=device,
                                        linear=linear.to(device))
    for level in settings.pairwise(settings.transform).levels():
        if level.control_spacing is not None:  # the linear levels were step 1
            registration.run_level(level)
    jacobian = None
    if registration.deformation is not None:
        jacobian = jacobian_statistics(registration.deformation, case.grid, device=device)
    with torch.no_grad():
        points = map_grid(registration.transform, case.grid, device)
        warped_image, inside = sample_image(image.data.to(device), image.grid, points)
        warped_labels, _ = sample_image(onehot.data.to(device), onehot.grid, points)
    return {"image": warped_image[0].cpu().numpy(), "labels": warped_labels.cpu().numpy(),
            "inside": inside.cpu().numpy(), "jacobian": jacobian}


def _one_thread() -> None:
    torch.set_num_threads(1)
    logging.getLogger("mvmm").setLevel(logging.WARNING)


# the worker pools of this process by size, kept for the next call (module notes)
_POOLS: Dict[int, ProcessPoolExecutor] = {}


def worker_pool(workers: int, jobs: int, device: str) -> Optional[ProcessPoolExecutor]:
    """Spawned worker processes (one torch thread each) for ``jobs`` jobs, or None to run in this process:
    ``workers`` of them (0: one per available core), none on CUDA (one process drives the GPU; worker
    processes are for CPU cores). The pool is this process's pool of that size, started on first use and
    reused (:func:`stop_workers` ends it); its processes start as jobs need them."""
    workers = workers or available_cores()
    if device.startswith("cuda") or workers <= 1 or jobs <= 1:
        return None
    if workers not in _POOLS:
        # spawn, not fork: a forked torch process can deadlock on the parent's thread pools
        _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_one_thread)
    return _POOLS[workers]


def stop_workers() -> None:
    """End the worker processes this process started (:func:`worker_pool`); the next call starts new ones."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True, cancel_futures=True)


def _discard(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` without waiting (an interrupted or failed call: its queued jobs are cancelled, a broken
    pool cannot be reused) and forget it."""
    for size, kept in list(_POOLS.items()):
        if kept is pool:
            del _POOLS[size]
    pool.shutdown(wait=False, cancel_futures=True)


def run_jobs(function, jobs: List[tuple], pool: Optional[ProcessPoolExecutor], desc: str, progress: bool) -> List:
    """``[function(*job) for job in jobs]``, in ``pool``'s processes when there is one."""
    bar = tqdm(total=len(jobs), desc=desc, unit="atlas", disable=not progress, leave=False)
    try:
        if pool is None:
            results = []
            for job in jobs:
                results.append(function(*job))
                bar.update(1)
            return results
        futures = [pool.submit(function, *job) for job in jobs]
        for future in futures:
            future.add_done_callback(lambda _: bar.update(1))
        return [future.result() for future in futures]
    except BrokenProcessPool:
        _discard(pool)
        raise InputError("MultiAtlasSettings.workers: the worker processes stopped before finishing (out of "
                         "memory, or a script without an `if __name__ == \"__main__\":` guard, which worker "
                         "processes need to start); set `MultiAtlasSettings.workers`=1 to register in this "
                         "process") from None
    except BaseException:
        if pool is not None:  # (Ctrl-C, a job's error): nothing of this call is left queued
            _discard(pool)
        raise
    finally:
        bar.close()


def local_ncc(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray, sigma_voxels: Sequence[float]) -> np.ndarray:
    """Normalised cross-correlation of ``fixed`` and ``moving`` in a Gaussian window around every voxel,
    counting only voxels of ``mask``; shape ``[*S]``, in [−1, 1], −1 outside ``mask``.

    Parameters
    ----------
    fixed, moving : np.ndarray, shape [*S]
    mask : np.ndarray, bool, shape [*S]
    sigma_voxels : sequence of float
        The window's standard deviation per array axis, in voxels.
    """
    local_mean = masked_window_mean(mask, sigma_voxels)
    f, m = fixed.astype(np.float64), moving.astype(np.float64)
    mean_f, mean_m = local_mean(f), local_mean(m)
    covariance = local_mean(f * m) - mean_f * mean_m
    var_f = np.maximum(local_mean(f * f) - mean_f ** 2, 0)
    var_m = np.maximum(local_mean(m * m) - mean_m ** 2, 0)
    eps = 1e-6 * float(f[mask].var() * m[mask].var()) + 1e-30 if mask.any() else 1.0
    ncc = covariance / np.sqrt(var_f * var_m + eps)
    return np.where(mask, np.clip(ncc, -1.0, 1.0), -1.0)


def fuse_labels(case: Image, warped: Sequence[dict], labels: LabelSet,
                settings: Union[MultiAtlasSettings, FitGuidedSettings]) -> np.ndarray:
    """The fused probabilities ``[K, *S]`` on the case grid (module notes, steps 4 and 5); ``warped``: each atlas's
    ``image``, ``labels`` and ``inside`` on that grid; ``settings``: its ``search_voxels`` (the local search before
    the weights, :func:`mvmm.joint_fusion.searched_atlases`), ``fusion``, ``window_mm``, ``temperature``,
    ``sigma_mm``."""
    spacing = np.asarray(case.grid.spacing[::-1])  # per array axis
    fixed = case.data[0].cpu().numpy()
    if settings.search_voxels:
        warped = searched_atlases(fixed, warped, search_radius(spacing, settings.search_voxels),
                                  settings.window_mm / spacing)
    if settings.fusion == "joint":
        weights = joint_fusion_weights(fixed, warped, settings.window_mm / spacing)
        return weighted_vote(warped, weights, labels, spacing, settings.sigma_mm)
    scores = []
    for atlas in warped:
        if settings.fusion == "local-ncc":
            scores.append(local_ncc(fixed, atlas["image"], atlas["inside"], settings.window_mm / spacing))
        else:
            scores.append(np.zeros(fixed.shape))
    best = np.max(np.stack(scores), axis=0) if scores else np.zeros(fixed.shape)
    # subtracting the best score first keeps exp() finite; it cancels in the normalisation
    weights = [np.exp((score - best) / settings.temperature) for score in scores]
    return weighted_vote(warped, weights, labels, spacing, settings.sigma_mm)


def weighted_vote(warped: Sequence[dict], weights: Sequence[np.ndarray], labels: LabelSet, spacing: np.ndarray,
                  sigma_mm: float) -> np.ndarray:
    """``Σ_i w_i L_i / Σ_i w_i`` over the atlases that cover a voxel (background where none does), smoothed by
    ``sigma_mm`` and renormalised: probabilities ``[K, *S]``.

    Parameters
    ----------
    warped : sequence of dict
        Each atlas on the case grid: ``labels [K, *S]``, ``inside [*S]`` (bool).
    weights : sequence of np.ndarray, each shape [*S]
    spacing : np.ndarray
        Voxel size (mm) per array axis.
    """
    shape = warped[0]["inside"].shape
    votes = np.zeros((len(labels),) + shape)
    total = np.zeros(shape)
    for atlas, weight in zip(warped, weights):
        weight = weight * atlas["inside"]
        votes += weight * atlas["labels"]
        total += weight
    # joint fusion's weights may be negative (they sum to one): a class voted below zero has none
    fused = np.clip(np.where(total > 0, votes / np.maximum(total, 1e-300), 0.0), 0.0, None)
    fused[labels.background_index][total <= 0] = 1.0
    if sigma_mm > 0:
        sigma = sigma_mm / spacing
        fused = np.stack([ndimage.gaussian_filter(channel, sigma, mode="nearest") for channel in fused])
    fused /= np.maximum(fused.sum(0, keepdims=True), 1e-12)
    return fused.astype(np.float32)


def multi_atlas_prior(case: Image, entries: Sequence[AtlasEntry], settings: MultiAtlasSettings,
                      labels: Optional[LabelSet] = None, device=None, progress: bool = False) -> Tuple[Atlas, dict]:
    """A subject-specific probabilistic atlas on ``case``'s grid from the labelled images ``entries``.

    Parameters
    ----------
    case : Image
        The case's image the atlases are registered to (channel 0), e.g. its LGE.
    entries : sequence of AtlasEntry
        Labelled images, of ``case``'s sequence for the default NCC (any grids, other subjects).
    settings : MultiAtlasSettings
    labels : LabelSet, optional
        Classes of the label maps (default: the values of the first map).
    device : torch.device or str, optional
        Where each registration runs (CPU workers when ``settings.workers`` > 1).

    Returns
    -------
    atlas : Atlas
        ``[K, *case.grid.shape]`` probabilities on ``case.grid`` (frame ``"world"``): the prior.
    report : dict
        Settings, every atlas's similarity after the affine step, the ones kept, their
        deformations' Jacobian statistics, and seconds.
    """
    if not entries:
        raise InputError(f"{ARGNAME}: no atlas to register")
    start = time.perf_counter()
    device = str(device) if device is not None else "cpu"
    if labels is None:  # the classes the first label map holds (named, if its values are)
        if entries[0].label_names:
            labels = parse_label_names(entries[0].label_names, "atlas_set_labels")[0]
        else:
            array, _, _ = io.read_array(entries[0].labels, ARGNAME)
            labels = LabelSet.from_values(label_values(array, entries[0].labels, ARGNAME))
    case = Image(case.data[:1].detach().cpu(), case.grid, case.name, case.source)
    pool = worker_pool(settings.workers, len(entries), device)
    job_device = device if pool is None else "cpu"
    linear = run_jobs(register_linear, [(case, e, settings, labels, job_device) for e in entries], pool,
                      "atlases: affine", progress)
    ranked = sorted(range(len(entries)), key=lambda i: -linear[i]["similarity"])
    kept = sorted(ranked[: settings.size] if settings.size else ranked)
    warped = run_jobs(register_and_warp, [(case, entries[i], settings, labels, linear[i]["linear"], job_device)
                                          for i in kept], pool, f"atlases: {settings.transform}", progress)
    for i, atlas in zip(kept, warped):
        if atlas["jacobian"] is not None:
            warn_if_folded(atlas["jacobian"], f"the {settings.transform.upper()} of atlas {entries[i].name}")
    probabilities = fuse_labels(case, warped, labels, settings)
    sequence = entries[0].sequence or "image"
    source = f"multi-atlas ({len(kept)} of {len(entries)} {sequence} atlases, {settings.fusion} fusion)"
    report = {"settings": asdict(settings), "atlases": [e.name for e in entries],
              "similarity_after_affine": [linear[i]["similarity"] for i in range(len(entries))],
              "kept": [entries[i].name for i in kept],
              "jacobians": {entries[i].name: w["jacobian"] for i, w in zip(kept, warped) if w["jacobian"]},
              "seconds": time.perf_counter() - start}
    log.info("%s built in %.1f s", source, report["seconds"])
    return Atlas(torch.from_numpy(probabilities), case.grid, labels, source, "world"), report


def foreground_centre(maps: Image, background_index: int) -> np.ndarray:
    """World position (mm) of the centre of mass of ``maps``' foreground (one minus the background channel of
    probability or one-hot maps ``[K, *S]``), shape ``(ndim,)``."""
    weight = (1 - maps.data[background_index].double()).clamp_min(0)
    if float(weight.sum()) <= 0:
        raise InputError(f"{ARGNAME}: {maps.source} has no foreground (only background)")
    return weighted_centre(weight, maps.grid)


def register_labels_to_fit(fit: Image, fit_centre: np.ndarray, entry: AtlasEntry, settings: FitGuidedSettings,
                           labels: LabelSet, grid, device: str = "cpu", with_image: bool = False) -> dict:
    """One atlas's one-hot labels registered to a fit's posterior ``fit [K, *S]`` (SSD of probability maps,
    rigid → affine → ``settings.transform``) and resampled onto ``grid`` (linear: partial volumes stay soft).
    ``fit_centre``: the fit's :func:`foreground_centre`, where the label map's is laid first. ``with_image``:
    the atlas's image too, warped by the same map (for the local NCC weights of :func:`fuse_labels`).

    Returns numpy arrays ``labels [K, *grid.shape]``, ``inside [*grid.shape]`` (bool), with ``with_image``
    ``image [*grid.shape]``, the similarity after registration (minus the SSD), the Dice of its foreground and
    the fit's on the fit's grid (``agreement``) and the deformation's Jacobian statistics (None for a linear
    transform); or ``{"failed": reason}`` when the registration lost the overlap.
    """
    device = torch.device(device)
    image, onehot = read_atlas(entry, grid, labels) if with_image else (None, read_labels(entry, grid, labels))
    # start with the anatomies' centres on each other: the frame placement lays the fields of view's centres on
    # each other, and neither heart need be near its centre (an uncropped scan; the fit's grid cut to the heart)
    shift = np.eye(grid.ndim + 1)
    shift[:-1, -1] = fit_centre - foreground_centre(onehot, labels.background_index)
    onehot = Image(onehot.data, onehot.grid.moved(shift), onehot.name, onehot.source)
    registration = PairwiseRegistration(fit, onehot, settings.pairwise(), device=device)
    try:
        result = registration.run()
    except InputError as error:  # it slid off the fit (the SSD counts only where both are): this atlas is dropped
        return {"failed": str(error)}
    jacobian = None
    if registration.deformation is not None:
        jacobian = jacobian_statistics(registration.deformation, grid, device=device)
    background = labels.background_index
    with torch.no_grad():
        points = map_grid(registration.transform, grid, device)
        warped, inside = sample_image(onehot.data.to(device), onehot.grid, points)
        # how well its anatomy ended on the fit's: Dice of the foregrounds on the fit's grid (usually ``grid``)
        on_fit, covered = (warped, inside) if fit.grid.same_geometry(grid) else sample_image(
            onehot.data.to(device), onehot.grid, map_grid(registration.transform, fit.grid, device))
        ours, theirs = (1 - on_fit[background]) * covered, 1 - fit.data[background].to(device)
        agreement = float(2 * (ours * theirs).sum() / (ours.sum() + theirs.sum()).clamp_min(1e-6))
        out = {"labels": warped.cpu().numpy(), "inside": inside.cpu().numpy(), "jacobian": jacobian,
               "similarity": -float(result.loss_after), "agreement": agreement}
        if image is not None:  # the image shares the label map's voxels, so the label map's (moved) grid is its
            out["image"] = sample_image(image.data.float().to(device), onehot.grid, points)[0][0].cpu().numpy()
    return out


def fit_guided_fusion(entries: Sequence[AtlasEntry], settings: FitGuidedSettings,
                      reference: Optional[Image]) -> Tuple[str, str]:
    """How a fit-guided prior's label maps are fused, and why: ``settings.fusion``, except that local NCC and
    joint fusion weights need ``reference`` (the image on whose grid the prior is made) and atlas images of its sequence
    (another data set's — ACDC's cine frames for an LGE case — vote equally: their images cannot be compared
    with it)."""
    if settings.fusion == "vote":
        return "vote", "settings"
    if reference is None:
        return "vote", "no reference image was given"
    other = sorted({e.sequence for e in entries if e.sequence.lower() != reference.name.lower()})
    if other:
        return "vote", f"the atlas set's images are not of the reference's sequence {reference.name!r}: {other}"
    return settings.fusion, "settings"


def fit_guided_prior(fit: Image, entries: Sequence[AtlasEntry], settings: FitGuidedSettings, labels: LabelSet,
                     grid, device=None, progress: bool = False, reference: Optional[Image] = None
                     ) -> Tuple[Atlas, dict]:
    """A subject-specific prior on ``grid`` from the atlas set's label maps registered to a first fit.

    Parameters
    ----------
    fit : Image
        A fit's posterior ``[K, *S]`` (its classes those of ``labels``, in order) on its grid.
    entries : sequence of AtlasEntry
        The labelled images of other subjects; only their label maps are read.
    settings : FitGuidedSettings
    labels : LabelSet
        The classes of the label maps and of ``fit``.
    grid : Grid
        Where the prior is wanted (the case's reference grid).
    device : torch.device or str, optional
        Where each registration runs (CPU workers when ``settings.workers`` > 1).
    reference : Image, optional
        The case's reference image ``[1, *grid.shape]`` on ``grid``: with ``settings.fusion`` "local-ncc" (or
        "joint") and an atlas set of its sequence, each map votes by how well its image, warped by the same map,
        matches it there (and, jointly, how the maps' errors there go together; :func:`fit_guided_fusion`).

    Returns
    -------
    atlas : Atlas
        ``[K, *grid.shape]``: the (weighted) mean of the registered label maps where they cover a voxel, smoothed
        by ``settings.sigma_mm`` (frame ``"world"``).
    report : dict
        Settings, the atlases, those kept and those left out (a registration that lost the overlap, or whose
        foreground ended with Dice under :data:`MIN_FIT_AGREEMENT` on the fit's: a warning each), each kept
        one's similarity and agreement after registration, their deformations' Jacobian statistics, and seconds.
    """
    if not entries:
        raise InputError(f"{ARGNAME}: no atlas to register")
    if fit.data.shape[0] != len(labels):
        raise ValueError(f"fit: {fit.data.shape[0]} probability maps for {len(labels)} labels")
    start = time.perf_counter()
    device = str(device) if device is not None else "cpu"
    fit = Image(fit.data.detach().float().cpu(), fit.grid, fit.name, fit.source)
    centre = foreground_centre(fit, labels.background_index)  # every label map starts there
    fusion, why = fit_guided_fusion(entries, settings, reference)
    if fusion != settings.fusion:
        log.info("the atlas set's label maps vote equally: %s", why)
    if fusion != "vote" and not reference.grid.same_geometry(grid):  # before the registrations, not after
        raise ValueError("reference: not on `grid`")
    pool = worker_pool(settings.workers, len(entries), device)
    warped = run_jobs(register_labels_to_fit,
                      [(fit, centre, e, settings, labels, grid, device if pool is None else "cpu", fusion != "vote")
                       for e in entries], pool, f"atlases: {settings.transform} to the fit", progress)
    dropped = {}
    for entry, atlas in zip(entries, warped):
        if "failed" in atlas:
            dropped[entry.name] = atlas["failed"]
        elif atlas["agreement"] < MIN_FIT_AGREEMENT:
            dropped[entry.name] = f"its foreground ended with Dice {atlas['agreement']:.2f} on the fit's"
        elif atlas["jacobian"] is not None:
            warn_if_folded(atlas["jacobian"], f"the {settings.transform.upper()} of atlas {entry.name}")
    for name, reason in dropped.items():
        log.warning("atlas %s left out of the prior: its registration to the first fit lost the anatomy (%s)", name,
                    reason)
    kept = [(entry, atlas) for entry, atlas in zip(entries, warped) if entry.name not in dropped]
    if not kept:
        raise InputError(f"{ARGNAME}: no atlas's label map could be registered to the first fit (is the fit on the "
                         f"anatomy? check its overview.png): {dropped}")
    if fusion == "vote":
        spacing = np.asarray(grid.spacing[::-1])
        probabilities = weighted_vote([atlas for _, atlas in kept], [np.ones(atlas["inside"].shape) for _ in kept],
                                      labels, spacing, settings.sigma_mm)
    else:
        probabilities = fuse_labels(reference, [atlas for _, atlas in kept], labels, settings)
    source = f"multi-atlas ({len(kept)} label maps registered to the first fit)"
    report = {"guide": "fit", "settings": asdict(settings), "fusion": fusion, "fusion_reason": why,
              "atlases": [e.name for e in entries],
              "kept": [e.name for e, _ in kept], "dropped": dropped,
              "similarity": {e.name: w["similarity"] for e, w in kept},
              "agreement": {e.name: w["agreement"] for e, w in kept},
              "jacobians": {e.name: w["jacobian"] for e, w in kept if w["jacobian"]},
              "seconds": time.perf_counter() - start}
    log.info("%s built in %.1f s", source, report["seconds"])
    return Atlas(torch.from_numpy(probabilities), grid, labels, source, "world"), report
