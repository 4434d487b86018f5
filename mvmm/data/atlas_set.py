"""Atlas sets: labelled images of other subjects, the input of multi-atlas segmentation and of template
atlases.

An atlas set is a list of *entries*, each one image with its manual label map on the same grid, of a
named subject and sequence. It is given as

- a CSV file with the columns ``subject``, ``sequence``, ``image`` and ``labels`` (one row per
  labelled image; relative paths are relative to the CSV's folder) and optionally ``label_names``
  (that row's label values named by tissue, below), or
- a folder whose label maps are named ``<stem>_manual``, ``<stem>_labels`` or ``<stem>_gt`` (any image
  extension SimpleITK reads) beside their image ``<stem>``; the stem's last ``_`` part is the
  sequence and the rest the subject (``patient3_LGE.nii.gz`` + ``patient3_LGE_manual.nii.gz``:
  subject ``patient3``, sequence ``LGE`` — the layout of the MS-CMRSeg release; ACDC's
  ``patient071_frame01_gt.nii.gz``: subject ``patient071``, sequence ``frame01``), or a stem
  without ``_`` is a subject with sequence ``""``.

An atlas set from another data set may use other label values than the case's atlas (ACDC: 1 RV, 2 Myo,
3 LV; MS-CMRSeg: 600, 200, 500): ``label_names`` (``mvmm segment --atlas-set-labels RV=1,Myo=2,LV=3``, or
the CSV column) names them by tissue, and they are matched to the case's classes by name
(:func:`mvmm.data.labels.one_hot`). Without it a label map must hold the case's label values.

Only paths are read here; images are read when used.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mvmm.core.errors import InputError
from mvmm.data.labels import parse_label_names

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
LABEL_SUFFIXES = ("_manual", "_labels", "_gt")
CSV_COLUMNS = ("subject", "sequence", "image", "labels")  # and, optionally, label_names


@dataclass(frozen=True)
class AtlasEntry:
    """One labelled image of an atlas set: ``image`` and ``labels`` share a grid; ``label_names``
    (``"RV=1,Myo=2,LV=3"``) names the label map's values when they are not the case's (module notes)."""

    subject: str
    sequence: str
    image: Path
    labels: Path
    label_names: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.subject} {self.sequence}".strip()


def _split_suffix(name: str):
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return None, None


def _from_folder(folder: Path, argname: str) -> List[AtlasEntry]:
    entries = []
    for path in sorted(folder.iterdir()):
        stem, suffix = _split_suffix(path.name)
        if stem is None:
            continue
        for tag in LABEL_SUFFIXES:
            if stem.endswith(tag):
                image_stem = stem[: -len(tag)]
                image = path.with_name(image_stem + suffix)
                if not image.is_file():
                    raise InputError(f"{argname}: label map {path} has no image {image.name} beside it")
                subject, _, sequence = image_stem.rpartition("_")
                if not subject:
                    subject, sequence = image_stem, ""
                entries.append(AtlasEntry(subject, sequence, image, path))
    return entries


def _from_csv(path: Path, argname: str) -> List[AtlasEntry]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise InputError(f"{argname}: cannot read {path} as CSV ({err})") from None
    missing = [c for c in CSV_COLUMNS if c not in header]
    if not rows or missing:
        raise InputError(f"{argname}: {path} needs a header with the columns {', '.join(CSV_COLUMNS)} and at "
                         f"least one row" + (f" (missing: {', '.join(missing)})" if missing else ""))
    entries = []
    for number, row in enumerate(rows, start=2):
        files = {}
        for column in ("image", "labels"):
            text = (row[column] or "").strip()
            file = Path(text) if Path(text).is_absolute() else path.parent / text
            if not text or not file.is_file():
                raise InputError(f"{argname}: {path} line {number}: {column} {text!r} is not a file")
            files[column] = file
        entries.append(AtlasEntry((row["subject"] or "").strip(), (row["sequence"] or "").strip(),
                                  files["image"], files["labels"], (row.get("label_names") or "").strip() or None))
    return entries


def read_atlas_set(path, argname: str = "atlas_set", label_names: Optional[str] = None) -> List[AtlasEntry]:
    """The entries of the atlas set at ``path`` (a CSV file or a folder; module notes); ``label_names``
    (``"RV=1,Myo=2,LV=3"``) names the label values of every entry that does not name its own (a CSV's
    ``label_names`` column), checked here.

    Raises InputError naming ``argname`` when the path does not exist, holds no labelled image, or a
    row or label map lacks its image, and naming ``atlas_set_labels`` when ``label_names`` does not parse.
    """
    path = Path(path)
    if path.is_dir():
        entries = _from_folder(path, argname)
    elif path.is_file():
        entries = _from_csv(path, argname)
    else:
        raise InputError(f"{argname}: {path} is neither a folder nor a CSV file")
    if not entries:
        raise InputError(f"{argname}: {path} holds no labelled image (a folder needs label maps named "
                         f"<stem>_manual.nii.gz, <stem>_labels.nii.gz or <stem>_gt.nii.gz beside <stem>.nii.gz)")
    # errors now, not in a worker process: a CSV row's own names, then the set's
    for entry in entries:
        if entry.label_names:
            parse_label_names(entry.label_names, f"{argname}: {path}: label_names of {entry.name}")
    if label_names is not None:
        parse_label_names(label_names, "atlas_set_labels")
        entries = [e if e.label_names else replace(e, label_names=label_names) for e in entries]
    return entries


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def entries_of(entries: Sequence[AtlasEntry], sequence: str, exclude: Sequence[str] = (),
               argname: str = "atlas_set") -> List[AtlasEntry]:
    """The entries of ``sequence`` (case-insensitive), without the subjects in ``exclude``, in natural
    subject order; an error naming the sequences there are when there is none."""
    chosen = [e for e in entries if e.sequence.lower() == sequence.lower() and e.subject not in set(exclude)]
    if not chosen:
        there = sorted({e.sequence or "<none>" for e in entries})
        raise InputError(f"{argname}: no labelled {sequence!r} image (the set has the sequences "
                         f"{', '.join(there)}); name the case's images as the set's sequences (`names`)")
    return sorted(chosen, key=lambda e: _natural_key(e.subject))


def label_maps_of(entries: Sequence[AtlasEntry], sequence: str, argname: str = "atlas_set") -> List[AtlasEntry]:
    """The entries whose label maps a fit-guided prior registers: those of ``sequence`` when the set has it
    (:func:`entries_of`), else every entry — another data set's, e.g. ACDC's cine frames for an LGE case: only
    the label maps are read, and the anatomy they hold does not depend on the sequence."""
    if any(e.sequence.lower() == sequence.lower() for e in entries):
        return entries_of(entries, sequence, argname=argname)
    return sorted(entries, key=lambda e: (_natural_key(e.subject), _natural_key(e.sequence)))


def sequences_by_subject(entries: Sequence[AtlasEntry]) -> Dict[str, Dict[str, AtlasEntry]]:
    """``{subject: {sequence: entry}}``."""
    out: Dict[str, Dict[str, AtlasEntry]] = {}
    for entry in entries:
        out.setdefault(entry.subject, {})[entry.sequence] = entry
    return out


def match_sequence(name: str, sequences: Sequence[str]) -> Optional[str]:
    """The one of ``sequences`` that ``name`` names (case-insensitive), or None."""
    for sequence in sequences:
        if sequence.lower() == name.lower():
            return sequence
    return None
