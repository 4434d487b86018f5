"""From image files to labels: load a case, fit the mixture, predict on every grid, write outputs.

This is the Python API behind ``mvmm segment``; a script can call the same three steps::

    subject = load_subject(["LGE.nii.gz", "C0.nii.gz"], names=["LGE", "C0"])
    result = segment_subject(subject, subtypes=["LGE:Myo=2"])
    result.write("out/")
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mvmm import __version__
from mvmm.core.grid import Grid
from mvmm.core.settings import (CARDIAC_MIN_POSTERIOR_SHIFT, CARDIAC_PRESET, CARDIAC_TISSUES, NO_ATLAS, PRESETS,
                                PathologySettings, SEGMENTATION)
from mvmm.data import io
from mvmm.data.anatomy import stack_axis
from mvmm.data.atlas import BUILTIN_CARDIAC, DEFAULT_SIGMA_MM, Atlas
from mvmm.data.atlas_set import AtlasEntry, entries_of, label_maps_of, read_atlas_set
from mvmm.data.bias import bias_corrected
from mvmm.data.image import Image
from mvmm.data.labels import CARDIAC_LABELS, PATHOLOGY_LABELS, LabelSet
from mvmm.data.subject import CaseSample, Subject
from mvmm.core.devices import resolve_device
from mvmm.core.errors import InputError
from mvmm.joint import JointSolver, RegistrationResult, RegistrationSettings, default_registration, template_sequence
from mvmm.mixture.functional import most_probable_class
from mvmm.mixture.model import MultivariateMixture
from mvmm.mixture.subtypes import parse_subtype_names, parse_subtypes
from mvmm.multi_atlas import (FitGuidedSettings, MultiAtlasSettings, check_label_maps, fit_guided_prior,
                               multi_atlas_prior)
from mvmm.core.outputs import staged_output_dir, write_json
from mvmm.postprocess import check_postprocess, postprocess_labels
from mvmm.slice_alignment import with_aligned_slices
from mvmm.report import convergence_figure, overview_figure, pathology_figure
from mvmm.data.transform_files import save_transforms

log = logging.getLogger(__name__)

PARAMS_FORMAT = "mvmm-params/1"


def default_name(path) -> str:
    """Image name from its file name: ``LGE.nii.gz`` → ``LGE``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm", ".png", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_images(images: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None) -> list:
    """The images of a case, named by ``names`` or by their file names (unique)."""
    if not images:
        raise InputError("images: at least one image is needed")
    names = list(names) if names else [default_name(p) for p in images]
    if len(names) != len(images):
        raise InputError(f"names: {len(names)} names for {len(images)} images")
    if len(set(names)) != len(names):
        raise InputError(f"names: image names must be unique, got {names} (give `names`)")
    return [Image.read(p, n) for p, n in zip(images, names)]


def atlas_set_entries(atlas_set, reference: str, label_names: Optional[str] = None, labels_only: bool = False) -> list:
    """The entries of the atlas set ``atlas_set`` (a folder or CSV, :mod:`mvmm.data.atlas_set`) of the
    reference image's sequence (matched by name). ``label_names``: their label values named by tissue
    (``"RV=1,Myo=2,LV=3"``, when not the case's). ``labels_only``: for a fit-guided prior, which registers the
    label maps (their images, when of the reference's sequence, only weigh them) — a set without the reference's
    sequence (another data set's) gives all its entries (:func:`mvmm.data.atlas_set.label_maps_of`)."""
    entries = read_atlas_set(atlas_set, label_names=label_names)
    return label_maps_of(entries, reference) if labels_only else entries_of(entries, reference)


def load_subject(images: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None,
                 atlas: Optional[Sequence[str]] = None, labels: Optional[LabelSet] = None,
                 masks: Optional[Mapping[str, str]] = None, reference: Optional[str] = None,
                 atlas_sigma: float = DEFAULT_SIGMA_MM, roi_margin_mm: Optional[float] = None,
                 atlas_set=None, multi_atlas: Optional[MultiAtlasSettings] = None, device: str = "auto",
                 progress: bool = False, atlas_set_labels: Optional[str] = None) -> Subject:
    """Read a case from files and check it.

    Parameters
    ----------
    images : sequence of path
        Source images (any format SimpleITK reads).
    names : sequence of str, optional
        One name per image (default: the file names without extension).
    atlas : sequence of str, optional
        ``["builtin:cardiac"]`` (the default when None), ``["none"]`` for a plain mixture, one
        probability image, or one or more label maps on one grid.
    labels : LabelSet, optional
        Tissue names and label values; checked against the atlas.
    masks : mapping of image name to path, optional
    reference : str, optional
        Name of the image whose grid is the common space (default: the first).
    atlas_sigma : float
        Smoothing (mm) of label-map atlases.
    roi_margin_mm : float, optional
        Fit only near the atlas foreground (see :class:`mvmm.data.subject.Subject`).
    atlas_set : path, optional
        Labelled images of other subjects (a folder or CSV, :mod:`mvmm.data.atlas_set`): instead of
        ``atlas``, the prior is their labels fused on the reference image (:mod:`mvmm.multi_atlas`),
        from the set's images of the reference's sequence (matched by name).
    multi_atlas : MultiAtlasSettings, optional
        How (default: :class:`MultiAtlasSettings`' defaults).
    device, progress
        Where the multi-atlas registrations run; progress bars.
    atlas_set_labels : str, optional
        The atlas set's label values named by tissue (``"RV=1,Myo=2,LV=3"``) when they are not ``labels``'.
    """
    loaded = read_images(images, names)
    names = [im.name for im in loaded]
    mask_images = {}
    for name, path in (masks or {}).items():
        if name not in names:
            raise InputError(f"masks: {name!r} is not one of the image names {names}")
        mask_images[name] = Image.read(path, f"{name}_mask", argname="masks")
    reference_image = loaded[names.index(reference)] if reference in names else loaded[0]
    reference_grid = reference_image.grid
    if atlas_set is not None:
        if atlas:
            raise InputError(f"atlas_set: give `atlas` or `atlas_set`, not both (atlas {list(atlas)})")
        entries = atlas_set_entries(atlas_set, reference_image.name, atlas_set_labels)
        reference_image.check_intensities()
        atlas_obj, _ = multi_atlas_prior(reference_image, entries, multi_atlas or MultiAtlasSettings(), labels,
                                         resolve_device(device), progress)
        return Subject(loaded, atlas_obj, mask_images, reference, labels=labels, roi_margin_mm=roi_margin_mm)
    atlas = list(atlas) if atlas else [BUILTIN_CARDIAC]
    if atlas == [NO_ATLAS]:
        atlas_obj = None
    elif atlas == [BUILTIN_CARDIAC]:
        atlas_obj = Atlas.builtin_cardiac(reference_grid, labels or CARDIAC_LABELS)
    elif any(a in (NO_ATLAS, BUILTIN_CARDIAC) for a in atlas):
        raise InputError(f"atlas: {NO_ATLAS!r} and {BUILTIN_CARDIAC!r} stand alone, got {atlas}")
    else:
        atlas_obj = Atlas.read(atlas, reference_grid.ndim, labels, atlas_sigma)
        if atlas_obj.frame == "axes":
            log.info("atlas %s is in image axes: placed on the axes and field-of-view centre of the reference",
                     atlas_obj.source)
        atlas_obj = atlas_obj.placed_for(reference_grid)
    return Subject(loaded, atlas_obj, mask_images, reference, labels=labels, roi_margin_mm=roi_margin_mm)


def preset_values(preset: str, subject: Subject, pathology: bool = False) -> dict:
    """The settings ``preset`` gives this case, by ``mvmm segment``'s option names (Python names:
    ``roi_margin_mm``, ``subtypes``, ``proportions``, ``postprocess``, ``atlas_search_mm``,
    ``affine_weight``, ``template_metric``); explicit choices override them.

    ``"cardiac"``: :data:`mvmm.core.settings.CARDIAC_PRESET`, its subtype items kept for the images
    so named (with ``pathology``, the named pathology subtypes instead: ``LGE:Myo=normal,scar``,
    ``T2:Myo=normal,oedema``); ``"none"``: nothing; ``"auto"``: cardiac when the atlas's tissues include
    :data:`~mvmm.core.settings.CARDIAC_TISSUES` (the built-in atlas, MS-CMRSeg label maps), else none.
    """
    if preset not in PRESETS:
        raise InputError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    if preset == "auto":
        cardiac = subject.atlas is not None and set(CARDIAC_TISSUES) <= set(subject.class_labels.names)
        preset = "cardiac" if cardiac else "none"
    if preset == "none":
        return {}
    if subject.atlas is None:
        raise InputError("preset: cardiac holds the tissue proportions at the atlas's and fits near it; it needs an "
                         "atlas (`atlas` none was given; use preset none)")
    if pathology:
        from mvmm.pathology import cardiac_pathology_subtypes

        return {**CARDIAC_PRESET, "subtypes": cardiac_pathology_subtypes(subject.names)}
    names = [n.lower() for n in subject.names]
    subtypes = [subject.names[names.index(image.lower())] + ":" + rest
                for image, rest in (item.split(":", 1) for item in CARDIAC_PRESET["subtypes"]) if image.lower() in names]
    return {**CARDIAC_PRESET, "subtypes": subtypes}


def model_preset_values(preset: str, labels: Optional[LabelSet], fit: bool = False) -> dict:
    """The settings ``preset`` gives ``segment --model`` (a model fixes its atlas, subtypes and
    proportions): of :data:`mvmm.core.settings.CARDIAC_PRESET`, the clean-up (``postprocess``) and, for
    a refinement by registration, ``affine_weight``, ``roi_margin_mm`` and (a ``bayes`` model's)
    ``prior_votes`` — as the MS-CMRSeg experiment runs ``bayes`` and ``bayes-refine``; ``fit`` (``--ensemble``'s classical fit of the
    model's atlas, the experiment's ``em-all``): all but the subtypes and proportions. ``"auto"``:
    cardiac when the model's ``labels`` include :data:`~mvmm.core.settings.CARDIAC_TISSUES`."""
    if preset not in PRESETS:
        raise InputError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    names = set(labels.names) if labels is not None else set()
    if preset == "none" or (preset == "auto" and not set(CARDIAC_TISSUES) <= names):
        return {}
    if fit:
        return {key: value for key, value in CARDIAC_PRESET.items() if key not in ("subtypes", "proportions")}
    return {key: CARDIAC_PRESET[key] for key in ("postprocess", "affine_weight", "roi_margin_mm", "prior_votes")}


def vote_weighted_mean(fits: Sequence["Segmentation"], posteriors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the ``fits``' ``posteriors [K, *S]`` (one each, on one grid), each weighted by its
    :attr:`Segmentation.votes` — so that every voter (a model, an atlas that votes) counts once."""
    return sum(fit.votes * posterior for fit, posterior in zip(fits, posteriors)) / sum(fit.votes for fit in fits)


@dataclass
class Segmentation:
    """A fitted case: the model, its posteriors on the common grid, and how it was obtained."""

    subject: Subject
    model: MultivariateMixture
    labels: LabelSet
    common: CaseSample
    posterior: torch.Tensor  # [K, *S] on the common grid
    settings: dict
    # seconds by step (registration_s, sample_s, fit_s, predict_s, write_s, …); registration_split_s
    # holds the registration's own split (RegistrationResult.seconds)
    timings: Dict[str, object] = field(default_factory=dict)
    registration: Optional[RegistrationResult] = None
    postprocess: str = "none"  # applied to every label map, see mvmm.postprocess
    pathology: bool = False  # write scar and oedema from the named subtypes (mvmm.pathology)
    # how scar and oedema are decided from those subtypes (the n-SD criterion by default)
    pathology_rule: PathologySettings = field(default_factory=PathologySettings)
    # the spatial prior is the answer (a network that predicts the posterior, e.g. the Chan–Vese CNN):
    # every grid's posterior is the prior sampled there, not the model's posterior
    prior_is_posterior: bool = False
    # further per-voxel maps on the common grid, written as NAME.nii.gz (e.g. a network's sample uncertainty)
    extra_maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    # an ensemble (mvmm.amortized.ensemble): fits of the case whose posteriors, on every grid, this one's
    # is the mean of (each weighted by its votes); the fields above are the first member's (its model,
    # transforms and clean-up)
    members: Tuple["Segmentation", ...] = ()
    # the registered atlas votes beside the model: every grid's posterior is the mean of the model's and
    # the prior there, (p(k | I) + π_k) / 2 — the posterior under a likelihood that, at each voxel, is
    # uninformative half of the time; what the model misreads (bright scar taken for blood) costs less
    prior_votes: bool = False
    # with prior_votes, the prior's weight w against the model's 1: the common grid's posterior is (p(k | I) + w π_k)
    # / (1 + w). 1 (equal votes) but in a refit on a fit-guided prior (FitGuidedSettings.prior_weight): joint fusion
    # already weighed that prior's atlases by the reference image, so the model's reading of it counts less there;
    # on the other images' own grids the prior votes once
    prior_weight: float = 1.0
    # a fit-guided multi-atlas prior (mvmm.multi_atlas.fit_guided_prior): the first fit, with the atlas, whose
    # posterior the atlas set's labels were registered to; this fit's prior came from it, so whether the images
    # found the heart is that fit's question (posterior_shift)
    guide: Optional["Segmentation"] = None

    @property
    def votes(self) -> int:
        """How many voters this posterior is the mean of: the model, its atlas if it votes (an ensemble:
        its members' together) — the weight of this fit in an :func:`mvmm.amortized.ensemble`."""
        if self.members:
            return sum(m.votes for m in self.members)
        return 2 if self.prior_votes else 1

    @property
    def device(self) -> torch.device:
        return self.posterior.device

    def label_map(self, posterior: Optional[torch.Tensor] = None, grid: Optional[Grid] = None,
                  keep_wall: Optional[np.ndarray] = None) -> np.ndarray:
        """Label values (the user's, e.g. 0/200/500/600) of the most probable class, post-processed, shape [*S].

        ``posterior`` on ``grid`` (default: the common posterior and grid, with the pathological wall
        kept, see :meth:`label_map_on`); the grid's stack axis is where post-processing cuts slices;
        ``keep_wall``: wall the cardiac clean-up keeps (:func:`mvmm.postprocess.postprocess_labels`).
        """
        if posterior is None and grid is None:
            return self.label_map_on(None)
        posterior = self.posterior if posterior is None else posterior
        grid = self.common.grid if grid is None else grid
        values = np.asarray(self.labels.values)
        slice_axis = grid.ndim - 1 - stack_axis(grid) if grid.ndim == 3 else 0  # ITK axis → array axis
        return postprocess_labels(values[most_probable_class(posterior).cpu().numpy()], self.labels, self.postprocess,
                                  slice_axis, keep_wall)

    def label_map_on(self, name: Optional[str] = None) -> np.ndarray:
        """:meth:`label_map` on image ``name``'s own grid (None: the common grid). With named pathology
        subtypes (``LGE:Myo=normal,scar``…) and the cardiac clean-up, the wall where the model finds
        scar or oedema stays myocardium (:func:`mvmm.pathology.pathological_wall`)."""
        from mvmm.pathology import pathological_wall

        sample = self.sample_on(name)
        posterior = self.posterior_on(sample, name)
        wall = None
        if self.postprocess == "cardiac" and not self.prior_is_posterior:
            wall = pathological_wall(self, sample)
        return self.label_map(posterior, sample.grid, keep_wall=wall)

    def entropy(self) -> torch.Tensor:
        """Posterior entropy in nats, [*S]: 0 where the model is certain, log K at most."""
        p = self.posterior.clamp_min(1e-12)
        return -(self.posterior * p.log()).sum(dim=0)

    def sample_on(self, name: Optional[str] = None) -> CaseSample:
        """The case (images, coverage, moved prior) on image ``name``'s own grid (None: the common grid)."""
        if self.is_common(name):
            return self.common
        grid = self.subject.image(name).grid
        points = None
        if name in self.subject.transforms:  # image voxels y sit at T_i⁻¹(y) in the common space
            with torch.no_grad():
                points = self.subject.transforms[name].inverse()(grid.world_points(device=self.device))
        return self.subject.sample(grid, device=self.device, points=points)

    def is_common(self, name: Optional[str]) -> bool:
        """Whether image ``name``'s own grid is the common grid (None: the common grid itself)."""
        return name is None or (self.subject.image(name).grid.same_geometry(self.common.grid)
                                and name not in self.subject.transforms)

    def posterior_on(self, sample: CaseSample, name: Optional[str] = None) -> torch.Tensor:
        """Posterior ``[K, *S]`` of the :meth:`sample_on` sample of image ``name``: the fitted model
        evaluated there (an ensemble: the mean of its members' posteriors on that image's grid)."""
        if sample is self.common:
            return self.posterior
        if self.members:  # each member moved the image and the atlas its own way: each samples its own
            # (the first is this fit's own: its sample is the one given)
            return vote_weighted_mean(self.members, [(m.posterior_on(sample, name) if m.subject is self.subject else
                                                      m.native_posterior(name)).to(self.device) for m in self.members])
        if self.prior_is_posterior:
            return sample.prior
        # on another image's own grid the prior votes once: its weight is for the reference image it was fused by
        # (another sequence, another breath-hold: there the prior is only an atlas; docs/mscmr.md, 0.26.0)
        return self.voted(self.model.predict_proba(sample.images, sample.coverage, sample.prior, sample.grid.spacing),
                          sample.prior, weight=1.0)

    def voted(self, posterior: torch.Tensor, prior: Optional[torch.Tensor],
              weight: Optional[float] = None) -> torch.Tensor:
        """The model's ``posterior [K, *S]`` as this fit writes it: with :attr:`prior_votes`, its mean with
        the ``prior`` on the same grid, the prior weighted by ``weight`` (default :attr:`prior_weight`)."""
        if not self.prior_votes:
            return posterior
        weight = self.prior_weight if weight is None else weight
        return (posterior + weight * prior.to(posterior.dtype)) / (1 + weight)

    def native_posterior(self, name: str) -> torch.Tensor:
        """Posterior ``[K, *S_i]`` on image ``name``'s own grid, as :meth:`posterior_on` gives it there."""
        return self.posterior_on(self.sample_on(name), name)

    def posterior_shift(self) -> Optional[float]:
        """How far the images moved the posterior from the registered atlas where the atlas expects
        anatomy: the mean over the covered voxels whose prior foreground exceeds ½ of the total-variation
        distance ½ Σ_k |p(k | I, x) − π_k(x)| between the model's posterior (before any vote of the atlas)
        and the prior. Near 0 the fitted Gaussians explain the images no better inside one tissue than
        across tissues — a mixture fitted on the wrong anatomy (:func:`check_posterior_shift`).
        None for a fit without a prior, an ensemble, or a network whose map is the answer. A fit on a
        fit-guided prior reports its first fit's (:attr:`guide`): its own prior was made from that posterior.
        """
        if self.guide is not None:
            return self.guide.posterior_shift()
        if self.subject.atlas is None or self.members or self.prior_is_posterior or self.common.prior is None:
            return None
        prior = self.common.prior.to(self.posterior.dtype)
        # with the atlas's vote the written posterior is (model + w prior) / (1 + w): undone here
        w = self.prior_weight
        model = (1 + w) * self.posterior - w * prior if self.prior_votes else self.posterior
        heart = ((1 - prior[self.labels.background_index]) > 0.5) & self.common.coverage.any(0)
        if not bool(heart.any()):
            return None
        return float(0.5 * (model - prior).abs().sum(0)[heart].mean())

    def quality(self) -> dict:
        """``report.json``'s ``quality``: :meth:`posterior_shift`, and for a cardiac atlas the floor below
        which :func:`check_posterior_shift` warns and whether this fit fell below it."""
        shift = self.posterior_shift()
        floor = CARDIAC_MIN_POSTERIOR_SHIFT if set(CARDIAC_TISSUES) <= set(self.labels.names) else None
        return {"posterior_shift": shift, "min_posterior_shift": floor,
                "low": shift is not None and floor is not None and shift < floor}

    def volumes_ml(self) -> Dict[str, float]:
        label_map = self.label_map()
        voxel = self.common.grid.voxel_volume_ml
        return {n: float((label_map == v).sum()) * voxel for n, v in zip(self.labels.names, self.labels.values)}

    def params_dict(self) -> dict:
        return {"format": PARAMS_FORMAT, "mvmm_version": __version__, "images": self.common.names,
                "labels": self.labels.as_dict(), "reference": self.subject.reference,
                "common_grid": self.common.grid.to_dict(), "model": self.model.to_dict()}

    def write(self, out_dir, force: bool = False) -> Dict[str, Path]:
        """Write every output into ``out_dir`` (see docs/cli.md); returns the written paths by role.

        Never overwrites without ``force``; with it, the previous run's outputs are replaced (none
        left stale). The files are written into a staging folder, read back, then moved into place:
        a failed or interrupted write leaves nothing (:func:`mvmm.core.outputs.staged_output_dir`).
        """
        with staged_output_dir(out_dir, force, verify=io.verify_written) as stage:
            staged = self._write_into(stage)
        return {role: Path(out_dir) / path.relative_to(stage) for role, path in staged.items()}

    def _write_into(self, out: Path) -> Dict[str, Path]:
        start = time.perf_counter()
        grid = self.common.grid
        label_dtype = np.int16 if max(map(abs, self.labels.values)) < 2 ** 15 else np.int32
        labels = self.label_map()  # post-processing included: compute once
        files = {"labels": out / "labels.nii.gz"}
        io.write_array(files["labels"], labels.astype(label_dtype), grid)
        for name in self.common.names:
            files[f"labels_{name}"] = out / f"labels_{name}.nii.gz"
            native = labels if self.is_common(name) else self.label_map_on(name)  # the reference's is computed
            io.write_array(files[f"labels_{name}"], native.astype(label_dtype), self.subject.image(name).grid)
        files["posteriors"] = out / "posteriors.nii.gz"
        io.write_array(files["posteriors"], self.posterior.cpu().numpy().astype(np.float32), grid)
        files["entropy"] = out / "entropy.nii.gz"
        io.write_array(files["entropy"], self.entropy().cpu().numpy().astype(np.float32), grid)
        for name, values in self.extra_maps.items():
            files[name] = out / f"{name}.nii.gz"
            io.write_array(files[name], values.cpu().numpy().astype(np.float32), grid)
        files["params"] = out / "params.json"
        write_json(files["params"], self.params_dict())
        files["overview"] = out / "overview.png"
        overview_figure(files["overview"], self.common.images.cpu().numpy(), self.common.coverage.cpu().numpy(),
                        labels, self.common.names, self.labels, grid, self.entropy().cpu().numpy(),
                        title=f"mvmm: {', '.join(self.common.names)} on the grid of {self.subject.reference}")
        if self.registration is not None:
            files["transforms"] = save_transforms(out / "transforms", self.registration.transforms, grid)
        files["convergence"] = out / "convergence.png"
        convergence_figure(files["convergence"], self.model.lower_bounds_,
                           self.registration.history if self.registration is not None else None,
                           title=f"mvmm: registration and EM ({', '.join(self.common.names)})")
        pathology = None
        if self.pathology:
            pathology_files, pathology = self._write_pathology(out / "pathology")
            files.update(pathology_files)
        self.timings["write_s"] = time.perf_counter() - start
        files["report"] = out / "report.json"
        write_json(files["report"], self.report(pathology))
        return files

    def _write_pathology(self, folder: Path) -> Tuple[Dict[str, Path], dict]:
        """Scar and oedema (:mod:`mvmm.pathology`) on the common grid and each image's grid and a figure;
        returns the files and their volumes for the report."""
        from mvmm.pathology import pathology_maps

        folder.mkdir()
        files: Dict[str, Path] = {}
        common = pathology_maps(self)
        files["pathology"] = folder / "pathology.nii.gz"
        io.write_array(files["pathology"], common.label_map(), common.grid)
        for p in common.names:
            files[f"{p}_probability"] = folder / f"{p}_probability.nii.gz"
            io.write_array(files[f"{p}_probability"], common.probability[p], common.grid)
        per_image = {}
        for name in self.common.names:
            native = common if self.is_common(name) else pathology_maps(self, name)
            files[f"pathology_{name}"] = folder / f"pathology_{name}.nii.gz"
            io.write_array(files[f"pathology_{name}"], native.label_map(), native.grid)
            for p in native.names:
                files[f"{p}_probability_{name}"] = folder / f"{p}_probability_{name}.nii.gz"
                io.write_array(files[f"{p}_probability_{name}"], native.probability[p], native.grid)
            per_image[name] = native.volumes()
        per_slice = common.per_slice()
        files["pathology_figure"] = folder / "pathology.png"
        pathology_figure(files["pathology_figure"], self.common.images.cpu().numpy(), self.common.coverage.cpu().numpy(),
                         self.common.names, common.tissue_mask[common.names[0]], common.mask, common.grid, per_slice,
                         title=f"mvmm: {', '.join(common.names)} on the grid of {self.subject.reference}")
        volumes = {"labels": {p: PATHOLOGY_LABELS[p] for p in common.names},
                   "common_grid": common.volumes(), "per_slice": per_slice, "images": per_image}
        return files, volumes

    def report(self, pathology: Optional[dict] = None) -> dict:
        """What ``report.json`` holds; ``pathology``: the volumes :meth:`write` found (with ``pathology``)."""
        coverage = self.common.coverage.float().mean(dim=tuple(range(1, self.common.coverage.dim())))
        return {
            "mvmm_version": __version__,
            "settings": self.settings,
            "device": str(self.device),
            "reference": self.subject.reference,
            "images": [{"name": im.name, "path": im.source, "size": list(im.grid.size),
                        "spacing_mm": list(im.grid.spacing), "coverage_of_common_grid": float(c)}
                       for im, c in zip(self.subject.images, coverage)],
            "atlas": self.subject.atlas.source if self.subject.atlas is not None else None,
            "labels": self.labels.as_dict(),
            "n_subtypes": {name: dict(zip(self.labels.names, map(int, row)))
                           for name, row in zip(self.common.names, self.model.n_subtypes_)},
            "em": {"iterations": self.model.n_iter_, "converged": self.model.converged_,
                   "log_likelihood": self.model.lower_bounds_},
            "registration": None if self.registration is None else {
                "history": self.registration.history, "atlas_jacobian": self.registration.jacobian,
                "template": self.registration.template, "fov_search": self.registration.fov_search,
                "work_grid": self.registration.work_grid, "transforms": sorted(self.registration.transforms)},
            "timings_s": self.timings,
            **({"extra_maps": sorted(f"{name}.nii.gz" for name in self.extra_maps)} if self.extra_maps else {}),
            "volumes_ml": self.volumes_ml(),
            "quality": self.quality(),
            **({"pathology": pathology} if pathology is not None else {}),
        }


def segment_subject(subject: Subject, subtypes: Sequence[str] = (),
                    background_subtypes: int = SEGMENTATION.background_subtypes,
                    mrf_beta: float = SEGMENTATION.mrf_beta, learn_proportions: bool = True,
                    max_iter: int = SEGMENTATION.max_iter, tol: float = SEGMENTATION.tol, var_floor: float = 1e-3,
                    device: str = "auto", seed: Optional[int] = 0, progress: bool = False,
                    registration: Union[RegistrationSettings, str, None] = "default",
                    postprocess: str = SEGMENTATION.postprocess, atlas_start: Optional[tuple] = None,
                    pathology: bool = False, bias_correction: str = SEGMENTATION.bias_correction,
                    prior_votes: bool = SEGMENTATION.prior_votes, atlas_set: Sequence[AtlasEntry] = (),
                    pathology_rule: Optional[PathologySettings] = None,
                    fit_guided: Optional[FitGuidedSettings] = None,
                    guided_fit_options: Optional[Mapping] = None,
                    guide: Optional["Segmentation"] = None) -> Segmentation:
    """Fit the multivariate mixture to a case on the reference grid and return its posteriors.

    Parameters
    ----------
    subject : Subject
    subtypes : sequence of str
        ``IMAGE:TISSUE=N`` items (``*`` for all), see :func:`mvmm.mixture.parse_subtypes`; they
        override the defaults (one subtype per tissue, ``background_subtypes`` for the background).
    background_subtypes : int
        Subtypes of the background class (value 0, else the first class) in every image.
    mrf_beta : float
        Potts MRF weight (0: none).
    learn_proportions : bool
        Estimate the global tissue proportions; False (with an atlas) keeps the atlas as the prior
        (see :class:`mvmm.mixture.MultivariateMixture`).
    device : {"auto", "cpu", "cuda"}
    seed : int, optional
        Seeds torch and the k-means initialisation of a plain mixture.
    registration : RegistrationSettings, "default" or None
        Move the atlas and/or the non-reference images while fitting (:mod:`mvmm.joint`); the
        transforms found are kept in ``subject.transforms`` of the result and written with it.
        ``"default"``: what ``mvmm segment`` does (:func:`mvmm.joint.default_registration`: the
        atlas moves rigidly then affinely, the images stay). None: nothing moves, the headers place
        everything.
    postprocess : {"none", "cardiac"}
        Clean-up of every label map of the result (:mod:`mvmm.postprocess`; ``"cardiac"`` assumes
        short-axis slices and tissues named LV and Myo); posteriors are left as fitted.
    atlas_start : (LinearTransform, deformation), optional
        Where the atlas starts the registration (:meth:`mvmm.joint.JointSolver.run`), e.g. a network's warp.
    pathology : bool
        Read scar and oedema from the subtypes named so (:mod:`mvmm.pathology`) and write them with
        the result; when ``subtypes`` names none, the cardiac ones are added first
        (``LGE:Myo=normal,scar``, ``T2:Myo=normal,oedema``, for the images so named).
    pathology_rule : PathologySettings, optional
        How scar and oedema are decided from those subtypes (default: its defaults, the n-SD criterion).
    bias_correction : {"none", "n4"}
        Divide every image by its N4 bias field before the fit (:mod:`mvmm.data.bias`); the result's
        subject holds the corrected images (``bias_s`` in the timings, the record in the settings).
    prior_votes : bool
        The registered atlas votes beside the fitted model: the posterior on every grid is their mean
        (:attr:`Segmentation.prior_votes`; the cardiac preset's choice). Needs an atlas.
    atlas_set : sequence of AtlasEntry
        Labelled images of other subjects (their label maps are read): after the fit, they are registered
        to its posterior and averaged into a prior on the reference grid, and the model is fitted again
        with that prior, nothing moving but the other images' slices, each in its plane (:func:`refit_with_atlas_set`;
        the result's :attr:`~Segmentation.guide` is the first fit). Empty: the fit is the answer.
    fit_guided : FitGuidedSettings, optional
        How the atlas set is registered and fused (default: its defaults).
    guided_fit_options : mapping, optional
        Options of this function that differ in the fit on the atlas set's prior (``learn_proportions``,
        ``prior_votes``): a ``vae-seg`` model's first fit keeps its decoded prior's proportions and does not let
        it vote, the fit on the atlas set's prior does both, as on an atlas (:func:`mvmm.amortized.segment_with_vae`).
    guide : Segmentation, optional
        With ``atlas_set``: an answer found elsewhere — a network's (:func:`mvmm.amortized.segment_with_vae`) — that
        the atlas set follows instead of a first fit here (none is run); ``subject`` holds its images and atlas
        and gives the fit on the atlas set's prior its region of interest.

    A cardiac fit whose images moved its posterior too little from the atlas most likely lost the heart
    (:meth:`Segmentation.quality`). When the atlas's start was searched (:func:`start_was_searched`:
    ``registration.atlas_search_mm`` > 0 and no template placed it), the fit is run again from where the
    search began (the field-of-view match or the header) and the one whose posterior moved further is
    kept (``settings["retry"]`` records both); a fit still below the floor warns
    (:func:`check_posterior_shift`).
    """
    if isinstance(registration, str):
        if registration != "default":
            raise InputError(f"registration: expected RegistrationSettings, 'default' or None, got {registration!r}")
        registration = default_registration(subject)
    if atlas_set and subject.atlas is not None:
        check_label_maps(atlas_set, subject.atlas.labels)  # an error now, not after the first fit
    options = dict(subtypes=subtypes, background_subtypes=background_subtypes, mrf_beta=mrf_beta,
                   learn_proportions=learn_proportions, max_iter=max_iter, tol=tol, var_floor=var_floor, device=device,
                   seed=seed, progress=progress, postprocess=postprocess, atlas_start=atlas_start, pathology=pathology,
                   bias_correction=bias_correction, prior_votes=prior_votes,
                   pathology_rule=pathology_rule or PathologySettings())
    if guide is not None:
        if not atlas_set:
            raise ValueError("guide: an answer for the atlas set to follow; give `atlas_set`")
        # the guide's image transforms stay (the atlas's is dropped by the refit); the region is the subject's
        result = replace(guide, subject=replace(subject, transforms=guide.subject.transforms))
        return refit_with_atlas_set(result, atlas_set, fit_guided or FitGuidedSettings(),
                                    {**options, **_guided_fit_options(guided_fit_options)})
    began = time.perf_counter()
    result = _segment_once(subject, registration=registration, **options)
    quality = result.quality()
    if quality["low"] and start_was_searched(subject, registration, atlas_start):
        # on MS-CMRSeg's LGE alone the likelihood's start search sometimes picks a start on the wrong anatomy
        # where the unsearched start finds the heart (docs/mscmr.md, "When the fit lost the heart")
        log.info("posterior shift %.3f is low: fitting again from the unsearched start", quality["posterior_shift"])
        retried = time.perf_counter()
        retry = _segment_once(subject, registration=replace(registration, atlas_search_mm=0.0), **options)
        shifts = {"searched start": quality["posterior_shift"], "unsearched start": retry.posterior_shift()}
        seconds = {"searched start": retried - began, "unsearched start": time.perf_counter() - retried}
        kept = max(shifts, key=shifts.get)
        dropped = "searched start" if kept == "unsearched start" else "unsearched start"
        result = retry if kept == "unsearched start" else result
        result.settings = {**result.settings, "retry": {"posterior_shift": shifts, "kept": kept}}
        result.timings["retry_s"] = seconds[dropped]  # the fit not kept
    check_posterior_shift(result)
    if atlas_set:
        result = refit_with_atlas_set(result, atlas_set, fit_guided or FitGuidedSettings(),
                                      {**options, **_guided_fit_options(guided_fit_options)})
    return result


def _guided_fit_options(given: Optional[Mapping]) -> dict:
    """:func:`segment_subject`'s ``guided_fit_options``, checked."""
    unknown = sorted(set(given or {}) - {"learn_proportions", "prior_votes"})
    if unknown:
        raise ValueError(f"guided_fit_options: only learn_proportions and prior_votes, got {unknown}")
    return dict(given or {})


def refit_with_atlas_set(first: Segmentation, atlas_set: Sequence[AtlasEntry], settings: FitGuidedSettings,
                         options: dict) -> Segmentation:
    """The fit again, on a prior made of ``atlas_set``'s label maps registered to ``first``'s posterior.

    The prior (:func:`mvmm.multi_atlas.fit_guided_prior`) is on the reference image's grid where the first
    fit placed the anatomy, so nothing moves in the second fit: the images keep the first fit's transforms
    (and bias correction), the atlas's is dropped; before it, each slice of the other images is moved in-plane
    to where the first fit's θ and the prior put it (``settings.slice_shift_mm``, :mod:`mvmm.slice_alignment`).
    ``options``: :func:`segment_subject`'s fitting options.
    On MS-CMRSeg, docs/mscmr.md ("A multi-atlas prior from the first fit").
    """
    if first.subject.atlas is None:
        raise InputError("atlas_set: a prior fitted to the first fit needs that fit to have an atlas (`atlas` none "
                         "was given)")
    began = time.perf_counter()
    subject = first.subject
    reference = subject.images[[im.name for im in subject.images].index(subject.reference)]
    fit = Image(first.posterior, first.common.grid, "posterior", "the first fit")
    prior, report = fit_guided_prior(fit, atlas_set, settings, first.labels, reference.grid,
                                     device=first.device, progress=options["progress"], reference=reference)
    transforms = {name: t for name, t in subject.transforms.items() if name != "atlas"}
    subject = replace(subject, atlas=prior, transforms=transforms)
    aligned_at = time.perf_counter()
    others = [name for name in subject.names if name != subject.reference]
    alignment = None
    if settings.slice_shift_mm > 0 and others:
        # each breath-hold's slice of the other images where the first fit's θ and the fused prior put it
        subject, alignment = with_aligned_slices(subject, first.model, others, settings.slice_shift_mm, first.device)
    aligned_s = time.perf_counter() - aligned_at
    # a prior fused by how each map's image matches the case has seen the image: it outweighs the model's reading of
    # it (FitGuidedSettings.prior_weight); an equal vote (another data set's maps, another sequence) has not
    weight = 1.0 if report["fusion"] == "vote" else settings.prior_weight
    second = _segment_once(subject, registration=None,
                           **{**options, "bias_correction": "none", "atlas_start": None}, prior_weight=weight)
    second.guide = first
    second.settings = {**second.settings, "bias_correction": first.settings["bias_correction"],
                       "atlas_set": report, "guide_fit": {key: first.settings[key] for key in ("registration", "retry")
                                                          if key in first.settings}}
    if alignment is not None:
        second.settings["slice_alignment"] = alignment
    first_seconds = sum(v for k, v in first.timings.items() if k.endswith("_s") and isinstance(v, float))
    second.timings = {**second.timings, "guide_fit_s": first_seconds, "atlas_set_s": report["seconds"],
                      "slice_alignment_s": aligned_s,
                      "fit_guided_s": time.perf_counter() - began}
    if "registration_split_s" in first.timings:  # the first fit's registration levels (its start search among them)
        second.timings["guide_registration_split_s"] = first.timings["registration_split_s"]
    return second


def start_was_searched(subject: Subject, registration: Optional[RegistrationSettings],
                       atlas_start: Optional[tuple] = None) -> bool:
    """Whether the likelihood's start search placed the atlas (what :func:`segment_subject`'s retry undoes):
    a search width, an atlas that moves, and neither a given start nor a template placing it."""
    return (registration is not None and registration.atlas_search_mm > 0 and registration.atlas != "none"
            and atlas_start is None and template_sequence(subject, registration) is None)


def _segment_once(subject: Subject, subtypes: Sequence[str], background_subtypes: int, mrf_beta: float,
                  learn_proportions: bool, max_iter: int, tol: float, var_floor: float, device: str,
                  seed: Optional[int], progress: bool, registration: Optional[RegistrationSettings], postprocess: str,
                  atlas_start: Optional[tuple], pathology: bool, bias_correction: str,
                  prior_votes: bool, prior_weight: float = 1.0,
                  pathology_rule: Optional[PathologySettings] = None) -> Segmentation:
    """One fit of :func:`segment_subject` (its parameters; ``registration`` resolved); ``prior_weight``: the
    prior's vote against the model's (:attr:`Segmentation.prior_weight`), a fit-guided refit's."""
    start = time.perf_counter()
    torch_device = resolve_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    if prior_votes and subject.atlas is None:
        raise InputError("prior_votes: the registered atlas's vote needs an atlas; a plain mixture has no prior")
    if not learn_proportions and subject.atlas is None:
        raise InputError("learn_proportions: held proportions (the prior is then the atlas) need an atlas; a plain mixture "
                         "has no prior but its proportions")
    labels = subject.class_labels
    check_postprocess(postprocess, labels)  # fail now, not after the fit
    base = np.ones((len(subject.names), len(labels)), dtype=np.int64)
    base[:, labels.background_index] = background_subtypes
    counts = parse_subtypes(subtypes, subject.names, labels.names, default=base)
    if pathology:
        subtypes = _pathology_subtypes(list(subtypes), subject.names, labels)
        counts = parse_subtypes(subtypes, subject.names, labels.names, default=base)
    # named subtypes are levels of one tissue (normal / scar): they share its variance (mvmm.pathology)
    named = parse_subtype_names(subtypes, subject.names, labels.names)
    tied = np.array([[n in named and t in named[n] for t in labels.names] for n in subject.names])
    model = MultivariateMixture(n_subtypes=counts, n_classes=len(labels), max_iter=max_iter, tol=tol,
                                var_floor=var_floor, mrf_beta=mrf_beta, random_state=seed,
                                learn_proportions=learn_proportions, progress=progress,
                                tied_variances=tied if tied.any() else None)
    subject, bias = bias_corrected(subject, bias_correction)  # before anything reads the intensities
    corrected = time.perf_counter()
    registered = None
    if registration is not None and (registration.active or template_sequence(subject, registration) is not None
                                     or atlas_start is not None):
        subject.sample(device=torch_device)  # fail on unusable input before the long part
        registered = JointSolver(model, registration, torch_device, progress).run(subject, atlas_start)
        subject = replace(subject, transforms={**subject.transforms, **registered.transforms})
    registered_at = time.perf_counter()
    with torch.no_grad():  # EM is closed-form; a caller's learnable transform must not grow a graph
        common = subject.sample(device=torch_device)
        sampled = time.perf_counter()
        # after registration, EM continues from the solver's parameters (fitted on its coarser grid)
        model.fit(common.images, common.coverage, common.prior, common.grid.spacing,
                  init_params=model.params_ if registered is not None and registered.history else None)
        fitted = time.perf_counter()
        posterior = model.predict_proba(common.images, common.coverage, common.prior, common.grid.spacing)
    settings = {"subtypes": list(subtypes), "background_subtypes": background_subtypes, "mrf_beta": mrf_beta,
                "postprocess": postprocess, "learn_proportions": learn_proportions, "prior_votes": prior_votes,
                **({"prior_weight": prior_weight} if prior_votes else {}),
                "roi_margin_mm": subject.roi_margin_mm,
                "max_iter": max_iter, "tol": tol, "var_floor": var_floor, "device": str(torch_device), "seed": seed,
                "registration": asdict(registration) if registration is not None else None,
                "bias_correction": bias}
    pathology_rule = pathology_rule or PathologySettings()
    if pathology:
        settings["pathology_rule"] = asdict(pathology_rule)
    timings = {"bias_s": corrected - start, "registration_s": registered_at - corrected,
               "sample_s": sampled - registered_at,
               "fit_s": fitted - sampled, "predict_s": time.perf_counter() - fitted}
    if registered is not None:  # the registration's own split: start search, template, each level
        timings["registration_split_s"] = dict(registered.seconds)
    result = Segmentation(subject, model, labels, common, posterior, settings, timings, registered, postprocess,
                          pathology, pathology_rule, prior_votes=prior_votes, prior_weight=prior_weight)
    result.posterior = result.voted(posterior, common.prior)
    return result


def check_posterior_shift(result: Segmentation) -> None:
    """Warn when a cardiac fit's images moved its posterior too little from the atlas
    (:meth:`Segmentation.quality`): on MS-CMRSeg's LGE alone such fits had lost the heart (Dice of the
    myocardium < 0.3), which nothing else flagged (docs/mscmr.md, "When the fit lost the heart")."""
    quality = result.quality()
    if quality["low"]:
        log.warning("the images moved the posterior little from the registered atlas (posterior shift %.3f, below "
                    "%.3f over the atlas's heart): the atlas most likely lies on the wrong anatomy and the labels are "
                    "unreliable; check overview.png. On MS-CMRSeg this flagged the LGE-alone fits that lost the "
                    "heart; with a cine image (C0) beside the LGE none did", quality["posterior_shift"],
                    quality["min_posterior_shift"])


def _pathology_subtypes(subtypes: list, names: Sequence[str], labels: LabelSet) -> list:
    """``subtypes`` with the cardiac pathology subtypes put first when they name no pathology; checked."""
    from mvmm.pathology import PATHOLOGIES, cardiac_pathology_subtypes, named_pathologies

    if not named_pathologies(subtypes, names, labels.names):
        if "Myo" not in labels.names:
            raise InputError(f"pathology: the cardiac pathology subtypes are of the myocardium (Myo), which the labels "
                             f"{labels.as_dict()} lack; name the subtypes with `subtypes`")
        subtypes = cardiac_pathology_subtypes(names) + subtypes
    if not named_pathologies(subtypes, names, labels.names):
        raise InputError(f"pathology: no image shows {' or '.join(PATHOLOGIES)} (images {', '.join(names)}; LGE shows "
                         f"scar, T2 oedema): name the images so, or name subtypes with `subtypes`, e.g. "
                         f"LGE:Myo=normal,scar")
    return subtypes


def load_params(path) -> dict:
    """Read a params.json written by :meth:`Segmentation.write`; ``["model"]`` becomes a fitted model."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"params: cannot read {path} ({err})") from None
    if d.get("format") != PARAMS_FORMAT:
        raise InputError(f"params: {path} is not an mvmm parameter file (format {d.get('format')!r})")
    d["model"] = MultivariateMixture.from_dict(d["model"])
    d["labels"] = LabelSet.from_dict(d["labels"])
    return d
