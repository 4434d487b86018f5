"""Data-set manifests: what a public data set is, where to get it, and how its files are named.

A manifest (``data_manifests/<name>.json``, format ``mvmm-manifest/1``) gives the citation, where the
official copy is obtained, the sequences (with the aliases releases use, e.g. DE for LGE), the label
values, and one or more file *layouts* (name templates). :func:`scan` finds the patients of a folder
under any layout and says plainly what is missing; mvmm ships no data, only these descriptions.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mvmm.data import io
from mvmm.data.labels import LabelSet
from mvmm.core.errors import InputError

MANIFEST_FORMAT = "mvmm-manifest/1"
# A source checkout (or editable install) reads the repository's folder; an installed wheel carries
# the same files as data files under <prefix>/share/mvmm (setup.cfg, [options.data_files]).
MANIFEST_DIRS = (Path(__file__).resolve().parents[2] / "data_manifests",
                 Path(sys.prefix) / "share" / "mvmm" / "data_manifests")


@dataclass
class Manifest:
    """A data set's description (see the module notes); ``raw`` keeps every field of the file."""

    name: str
    title: str
    citation: List[str]
    obtain: str
    sequences: Dict[str, List[str]]
    labels: LabelSet
    evaluate_on: str
    layouts: Dict[str, dict]
    path: Path
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def load(cls, name_or_path) -> "Manifest":
        """Read a manifest by name (``mscmr19``, from ``data_manifests/``) or from a JSON file path."""
        path = Path(name_or_path)
        if not path.suffix:
            found = [d / f"{name_or_path}.json" for d in MANIFEST_DIRS if (d / f"{name_or_path}.json").is_file()]
            path = found[0] if found else path
        if not path.is_file():
            known = sorted({p.stem for d in MANIFEST_DIRS if d.is_dir() for p in d.glob("*.json")})
            raise InputError(f"manifest: {name_or_path!r} not found (known: {', '.join(known) or 'none'}; "
                             f"looked in {', '.join(map(str, MANIFEST_DIRS))})")
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise InputError(f"manifest: {path} is not valid JSON ({err})") from None
        if raw.get("format") != MANIFEST_FORMAT:
            raise InputError(f"manifest: {path} is not an mvmm manifest (format {raw.get('format')!r})")
        try:
            sequences = {name: list(entry.get("aliases", [])) for name, entry in raw["sequences"].items()}
            return cls(raw["name"], raw["title"], list(raw["citation"]), raw["obtain"], sequences,
                       LabelSet.from_dict(raw["labels"]), raw["evaluate_on"], dict(raw["layouts"]), path, raw)
        except KeyError as err:
            raise InputError(f"manifest: {path} lacks the field {err}") from None

    def canonical_sequence(self, name: str, argname: str = "sequences") -> str:
        """The manifest's name of a sequence given by name or alias (case-insensitive)."""
        for canonical, aliases in self.sequences.items():
            if name.lower() in [canonical.lower()] + [a.lower() for a in aliases]:
                return canonical
        raise InputError(f"{argname}: {name!r} is not a sequence of {self.name} "
                         f"({', '.join(self.sequences)})")


@dataclass
class PatientFiles:
    """The files of one patient: images and manual labels by (canonical) sequence name."""

    patient: int
    layout: str
    images: Dict[str, Path] = field(default_factory=dict)
    labels: Dict[str, Path] = field(default_factory=dict)
    pathology: Dict[str, Path] = field(default_factory=dict)  # scar / oedema label maps (MyoPS), by sequence


@dataclass
class Scan:
    """What :func:`scan` found: patients by number, and problems with the requested ones."""

    data: Path
    patients: Dict[int, PatientFiles]
    problems: List[str]

    def summary(self, manifest: Manifest) -> str:
        """A few lines a person reads: counts per sequence, then the problems."""
        lines = [f"{manifest.title}", f"data: {self.data}", f"patients found: {len(self.patients)}"
                 + (f" ({_ranges(sorted(self.patients))})" if self.patients else "")]
        for seq in manifest.sequences:
            n_img = sum(seq in p.images for p in self.patients.values())
            n_lab = sum(seq in p.labels for p in self.patients.values())
            lines.append(f"  {seq:<5} images {n_img:3d}   manual labels {n_lab:3d}")
        layouts = sorted({p.layout for p in self.patients.values()})
        if layouts:
            lines.append(f"layout: {', '.join(layouts)}")
        lines += [f"problem: {p}" for p in self.problems] or ["no problems"]
        return "\n".join(lines)


def _pattern(template: str, file_sequence: str) -> re.Pattern:
    text = re.escape(template).replace(re.escape("{patient}"), r"(?P<patient>\d+)")
    return re.compile("^" + text.replace(re.escape("{file_sequence}"), re.escape(file_sequence)) + "$")


def scan(manifest: Manifest, data, patients: Optional[Sequence[int]] = None,
         sequences: Optional[Sequence[str]] = None, label_sequences: Sequence[str] = (),
         check_labels: bool = True, argname: str = "data") -> Scan:
    """Find the patients of ``data`` under the manifest's layouts and check what is asked for.

    Parameters
    ----------
    patients : sequence of int, optional
        Patients that must be there (default: whatever is found).
    sequences : sequence of str, optional
        Sequences whose images every requested patient must have.
    label_sequences : sequence of str
        Sequences whose manual labels every requested patient must have.
    check_labels : bool
        Read each needed label file and check its values against the manifest's labels.

    Returns
    -------
    Scan
        ``problems`` lists, one line each, every missing file and bad label map of the requested
        patients (empty when all is there).
    """
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"{argname}: {data} is not a folder")
    names = {p.name for p in data.iterdir() if p.is_file()}
    found: Dict[int, PatientFiles] = {}
    matches: Dict[int, Dict[str, int]] = {}
    for layout_name, layout in manifest.layouts.items():
        for seq, file_seq in layout["file_sequence"].items():
            for kind in ("image", "labels", "pathology"):
                if kind not in layout:
                    continue
                pattern = _pattern(layout[kind], file_seq)
                for name in sorted(names):
                    match = pattern.match(name)
                    if match:
                        number = int(match.group("patient"))
                        entry = found.setdefault(number, PatientFiles(number, layout_name))
                        {"image": entry.images, "labels": entry.labels, "pathology": entry.pathology}[kind][seq] = \
                            data / name
                        counts = matches.setdefault(number, {})
                        counts[layout_name] = counts.get(layout_name, 0) + 1
    for number, counts in matches.items():  # the layout that names most of the patient's files
        found[number].layout = max(counts, key=counts.get)
    sequences = [manifest.canonical_sequence(s) for s in (sequences or [])]
    label_sequences = [manifest.canonical_sequence(s) for s in label_sequences]
    requested = list(patients) if patients is not None else sorted(found)
    problems = []
    for number in requested:
        entry = found.get(number)
        if entry is None:
            problems.append(f"patient {number}: no files in {data}")
            continue
        for seq in sequences:
            if seq not in entry.images:
                problems.append(f"patient {number}: no {seq} image ({expected_names(manifest, seq, number, 'image')})")
        for seq in label_sequences:
            if seq not in entry.labels:
                problems.append(f"patient {number}: no {seq} manual labels "
                                f"({expected_names(manifest, seq, number, 'labels')})")
            elif check_labels:
                problem = _label_problem(entry.labels[seq], manifest.labels)
                if problem:
                    problems.append(f"patient {number}: {problem}")
    return Scan(data, found, problems)


def expected_names(manifest: Manifest, seq: str, number: int, kind: str) -> str:
    names = [layout[kind].format(patient=number, file_sequence=layout["file_sequence"][seq])
             for layout in manifest.layouts.values() if seq in layout["file_sequence"]]
    return "expected " + " or ".join(sorted(set(names)))


def _label_problem(path: Path, labels: LabelSet) -> Optional[str]:
    array, _, _ = io.read_array(path, "data")
    values = set(np.unique(array).tolist())
    unknown = sorted(v for v in values if v not in labels.values)
    if unknown:
        return f"{path.name} has label values {unknown} that are not in {labels.as_dict()}"
    if len(values - {labels.values[labels.background_index]}) == 0:
        return f"{path.name} has no labelled voxel"
    return None


def parse_patients(text: str, argname: str = "patients") -> List[int]:
    """``"1-25"``, ``"1,3,7-9"`` → list of patient numbers."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise InputError(f"{argname}: expected numbers and ranges such as 1-25 or 1,3,7-9, got {text!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise InputError(f"{argname}: range {part} runs backwards")
        out += [n for n in range(low, high + 1) if n not in out]
    return out


def _ranges(numbers: List[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)
