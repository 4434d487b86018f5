"""Myocardial pathology (scar, oedema) from the mixture's named subtypes: the model's own way.

MvMM gives a tissue, in each image, a mixture of Gaussian subtypes, independent across images given
the tissue (docs/model.md). Named subtypes (``LGE:Myo=normal,scar``, ``T2:Myo=normal,oedema``; names
in order of increasing mean intensity, :mod:`mvmm.mixture.subtypes`) are read as pathology::

    s(x) = P(c_LGE = scar   | Myo, x)        o(x) = P(c_T2 = oedema | Myo, x)
    P(scar   | x) = P(Myo | x) · s(x)
    P(oedema | x) = P(Myo | x) · o(x) · (1 − s(x))

Scar is bright in LGE (and also in T2); oedema is bright in T2 but not in LGE. So a myocardial voxel
enhanced in LGE is scar whatever its T2, and one bright in T2 alone is oedema — scar takes
precedence, as MyoPS labels it (:data:`PATHOLOGIES` gives the order). A pathology is defined only
where the image that shows it counts (a T2 stack of a few thick slices covers part of the heart):
elsewhere its probability is 0, its mask empty, and its share of the myocardium is reported over the
covered part only. Within a voxel labelled myocardium, the mask is decided by
:class:`~mvmm.core.settings.PathologySettings` (``Segmentation.pathology_rule``): by default (``"sd"``, 0.28.0)
the n-SD criterion of cardiac MR practice on the model's own Gaussians —

    scar   where I_LGE(x) > μ_normal,LGE + n_scar   · σ_Myo,LGE
    oedema where I_T2(x)  > μ_normal,T2  + n_oedema · σ_Myo,T2, and not scar

(μ_normal the darkest named subtype's fitted mean, σ the tissue's fitted standard deviation, which its named
subtypes share) — or (``"subtype"``) the most probable of normal, scar and oedema. The probability maps are the
subtypes' posteriors above under either rule.

Label maps of pathology use the MyoPS values (:data:`mvmm.data.labels.PATHOLOGY_LABELS`: 2221 scar,
1220 oedema, 0 elsewhere), so that ``mvmm evaluate`` compares them with MyoPS labels directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mvmm.core.errors import InputError
from mvmm.core.grid import Grid
from mvmm.core.settings import PathologySettings
from mvmm.data.anatomy import stack_axis
from mvmm.data.labels import PATHOLOGY_LABELS
from mvmm.mixture.subtypes import parse_subtype_names

PATHOLOGIES = ("scar", "oedema")  # in order of precedence: a voxel that is scar is not oedema
ALIASES = {"edema": "oedema", "infarct": "scar"}
# The cardiac defaults (``--pathology`` without names): which image shows which pathology, and how.
CARDIAC_PATHOLOGY_SUBTYPES = {"LGE": "Myo=normal,scar", "DE": "Myo=normal,scar", "T2": "Myo=normal,oedema"}


def cardiac_pathology_subtypes(image_names: Sequence[str]) -> List[str]:
    """``IMAGE:Myo=normal,scar`` for an image named LGE (or DE), ``IMAGE:Myo=normal,oedema`` for T2
    (names matched case-insensitively)."""
    return [f"{name}:{CARDIAC_PATHOLOGY_SUBTYPES[name.upper()]}" for name in image_names
            if name.upper() in CARDIAC_PATHOLOGY_SUBTYPES]


def named_pathologies(subtypes: Sequence[str], image_names: Sequence[str],
                      tissue_names: Sequence[str]) -> Dict[str, Tuple[str, str, int]]:
    """``{pathology: (image, tissue, position among the tissue's subtypes, darkest first)}``.

    Raises
    ------
    InputError
        When one pathology is named in two places.
    """
    found: Dict[str, Tuple[str, str, int]] = {}
    for image, by_tissue in parse_subtype_names(subtypes, image_names, tissue_names).items():
        for tissue, names in by_tissue.items():
            for position, name in enumerate(names):
                pathology = ALIASES.get(name.lower(), name.lower())
                if pathology not in PATHOLOGIES:
                    continue
                if pathology in found:
                    raise InputError(f"subtypes: {pathology} is named twice ({found[pathology][0]}:"
                                     f"{found[pathology][1]} and {image}:{tissue}); one image shows it")
                found[pathology] = (image, tissue, position)
    return found


@dataclass
class PathologyMaps:
    """Pathology on one grid.

    Attributes
    ----------
    grid : Grid
    names : list of str
        The pathologies found, in order of precedence.
    tissue : dict of str to str
        The tissue each pathology is a subtype of (Myo).
    probability : dict of str to np.ndarray, float32, shape [*S]
        ``P(tissue and pathology | x)``; 0 where the pathology is not defined.
    mask : dict of str to np.ndarray, bool, shape [*S]
    defined : dict of str to np.ndarray, bool, shape [*S]
        Where the image that shows the pathology counts.
    tissue_mask : dict of str to np.ndarray, bool, shape [*S]
        Where the label map has each pathology's tissue.
    """

    grid: Grid
    names: List[str]
    tissue: Dict[str, str]
    probability: Dict[str, np.ndarray]
    mask: Dict[str, np.ndarray]
    defined: Dict[str, np.ndarray]
    tissue_mask: Dict[str, np.ndarray]

    def label_map(self) -> np.ndarray:
        """MyoPS values: 2221 scar, 1220 oedema, 0 elsewhere, shape [*S] (int16)."""
        out = np.zeros(self.grid.shape, dtype=np.int16)
        for name in reversed(self.names):  # the first in precedence is written last
            out[self.mask[name]] = PATHOLOGY_LABELS[name]
        return out

    def volumes(self) -> dict:
        """Per pathology: ml, % of its tissue where it is defined, and how much of the tissue that is."""
        voxel = self.grid.voxel_volume_ml
        out = {}
        for name in self.names:
            tissue, defined = self.tissue_mask[name], self.defined[name]
            covered = int((tissue & defined).sum())
            out[name] = {"tissue": self.tissue[name], "ml": float(self.mask[name].sum()) * voxel,
                         "percent_of_tissue": 100.0 * float(self.mask[name].sum()) / covered if covered else None,
                         "tissue_ml_where_defined": covered * voxel,
                         "tissue_fraction_defined": covered / int(tissue.sum()) if tissue.any() else None}
        return out

    def per_slice(self) -> List[dict]:
        """Per slice of the stack (3D) holding the tissue: its ml and each pathology's ml and % (None
        where the pathology is not defined on the slice)."""
        if self.grid.ndim != 3 or not self.names:
            return []
        axis = 2 - stack_axis(self.grid)  # array axis of the stack
        voxel = self.grid.voxel_volume_ml
        spacing = self.grid.spacing[stack_axis(self.grid)]
        tissue = self.tissue_mask[self.names[0]]
        rows = []
        for k in range(self.grid.shape[axis]):
            in_tissue = np.take(tissue, k, axis=axis)
            if not in_tissue.any():
                continue
            row = {"slice": k + 1, "position_mm": k * spacing, "tissue_ml": float(in_tissue.sum()) * voxel}
            for name in self.names:
                defined = np.take(self.defined[name], k, axis=axis) & in_tissue
                count = float(np.take(self.mask[name], k, axis=axis).sum())
                row[f"{name}_ml"] = count * voxel if defined.any() else None
                row[f"{name}_percent"] = 100.0 * count / float(defined.sum()) if defined.any() else None
            rows.append(row)
        return rows


def _named_on(result, sample) -> Optional[tuple]:
    """``(names, located, defined, tissue_of)`` of the pathologies named in ``result``'s subtypes on ``sample`` (a
    :meth:`~mvmm.segment.Segmentation.sample_on` sample): their names in order of precedence, where each is named
    (:func:`named_pathologies`), where the image that shows it counts ``[*S]`` (bool) and its tissue's name; None
    when no subtype is named as a pathology."""
    located = named_pathologies(result.settings.get("subtypes", []), result.common.names, result.labels.names)
    if not located:
        return None
    names = [p for p in PATHOLOGIES if p in located]
    defined = {p: sample.coverage[sample.names.index(located[p][0])] for p in names}
    tissue_of = {p: located[p][1] for p in names}
    return names, located, defined, tissue_of


@torch.no_grad()
def _conditionals(result, sample, named: tuple) -> Dict[str, torch.Tensor]:
    """Per pathology of ``named`` (:func:`_named_on`'s answer), ``P(pathology | its tissue, x)`` after precedence
    ``[*S]``; 0 where it is not defined."""
    names, located, defined, tissue_of = named
    within = result.model.predict_subtype_proba(sample.images, sample.coverage, sample.prior, sample.grid.spacing)
    means = result.model.params_.means[0]  # [N, K, Cmax]
    conditional: Dict[str, torch.Tensor] = {}
    for pathology in names:
        image, tissue, position = located[pathology]
        i, k = sample.names.index(image), result.labels.names.index(tissue)
        # names are darkest first: the subtype at `position` in order of the fitted means
        order = torch.argsort(means[i, k, : int(result.model.n_subtypes_[i, k])])
        covered = defined[pathology]
        p = torch.where(covered, within[i][k, int(order[position])], torch.zeros((), dtype=within[i].dtype,
                                                                                device=covered.device))
        for earlier in conditional:  # precedence: scar before oedema
            if tissue_of[earlier] == tissue:
                p = p * (1.0 - conditional[earlier])
        conditional[pathology] = p
    return conditional


def _chosen(named: tuple, conditional: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per pathology, where it is the most probable of its tissue's levels (normal included) and defined."""
    names, _, defined, tissue_of = named
    chosen = {}
    for pathology in names:
        same = [conditional[q] for q in names if tissue_of[q] == tissue_of[pathology]]
        best = torch.stack(same + [1.0 - sum(same)]).amax(0)
        chosen[pathology] = (conditional[pathology] >= best) & defined[pathology]
    return chosen


@torch.no_grad()
def _above_normal(result, sample, named: tuple, rule: PathologySettings) -> Dict[str, torch.Tensor]:
    """Per pathology, where the image that shows it is more than ``rule``'s number of standard deviations above its
    tissue's normal (darkest named) subtype, and defined; scar before oedema (bool ``[*S]``)."""
    names, located, defined, tissue_of = named
    params = result.model.params_
    chosen: Dict[str, torch.Tensor] = {}
    for pathology in names:
        image, tissue, position = located[pathology]
        i, k = sample.names.index(image), result.labels.names.index(tissue)
        if position == 0:
            raise InputError(f"subtypes: {pathology} is named as the darkest subtype of {image}:{tissue}; the n-SD rule "
                             f"measures it above a normal level named before it (e.g. {image}:{tissue}=normal,"
                             f"{pathology}), or use PathologySettings.rule 'subtype'")
        count = int(result.model.n_subtypes_[i, k])
        normal = int(torch.argmin(params.means[0, i, k, :count]))
        threshold = params.means[0, i, k, normal] + rule.threshold_sd(pathology) * params.variances[0, i, k, normal].sqrt()
        above = (sample.images[i] > threshold.to(sample.images[i].dtype)) & defined[pathology]
        for earlier in chosen:  # precedence: scar before oedema
            if tissue_of[earlier] == tissue:
                above = above & ~chosen[earlier]
        chosen[pathology] = above
    return chosen


def _decided(result, sample, named: tuple, conditional: Optional[Dict[str, torch.Tensor]] = None
             ) -> Dict[str, torch.Tensor]:
    """Per pathology of ``named``, where ``result``'s rule (:attr:`mvmm.segment.Segmentation.pathology_rule`) calls
    it (bool ``[*S]``); ``conditional``: :func:`_conditionals`' answer if already computed (the n-SD rule needs none)."""
    rule = result.pathology_rule
    if rule.rule == "subtype":
        return _chosen(named, _conditionals(result, sample, named) if conditional is None else conditional)
    return _above_normal(result, sample, named, rule)


def _wall(chosen: Dict[str, torch.Tensor]) -> np.ndarray:
    """Where any pathology is chosen (bool ``[*S]``, numpy)."""
    return torch.stack(list(chosen.values())).any(0).cpu().numpy()


def pathological_wall(result, sample) -> Optional[np.ndarray]:
    """Where a named pathology is the most probable level of its tissue (bool ``[*S]`` on ``sample``'s
    grid), for the cardiac clean-up to keep as wall (:func:`mvmm.postprocess.close_blood_pool`'s
    ``keep``): papillary muscles in the cavity are normal muscle, and enhanced or oedematous wall at
    the endocardium is myocardium, as MyoPS labels it. None when no pathology is named."""
    named = _named_on(result, sample)
    if named is None:
        return None
    return _wall(_decided(result, sample, named))


@torch.no_grad()
def pathology_maps(result, name: Optional[str] = None) -> PathologyMaps:
    """Scar and oedema of a fitted case on the common grid (``name`` None) or on image ``name``'s grid.

    Parameters
    ----------
    result : mvmm.segment.Segmentation
        Fitted with named subtypes (``subtypes``, e.g. :func:`cardiac_pathology_subtypes`).
    name : str, optional

    Raises
    ------
    InputError
        When no subtype is named as a pathology.
    """
    labels = result.labels
    sample = result.sample_on(name)
    named = _named_on(result, sample)
    if named is None:
        raise InputError("subtypes: no subtype is named " + " or ".join(PATHOLOGIES) + "; name them, e.g. "
                         "LGE:Myo=normal,scar T2:Myo=normal,oedema (darkest first)")
    names, _, defined, tissue_of = named
    conditional = _conditionals(result, sample, named)
    chosen = _decided(result, sample, named, conditional)
    posterior = result.posterior_on(sample, name)
    label_map = result.label_map(posterior, sample.grid, keep_wall=_wall(chosen))
    probability, mask, tissue_mask = {}, {}, {}
    for pathology in names:
        k = labels.names.index(tissue_of[pathology])
        in_tissue = label_map == labels.values[k]
        mask[pathology] = in_tissue & chosen[pathology].cpu().numpy()
        probability[pathology] = (posterior[k] * conditional[pathology]).float().cpu().numpy()
        tissue_mask[pathology] = in_tissue
    return PathologyMaps(sample.grid, names, tissue_of, probability, mask,
                         {p: d.cpu().numpy() for p, d in defined.items()}, tissue_mask)
