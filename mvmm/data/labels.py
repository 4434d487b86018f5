"""Label sets: the user's label values (e.g. 0/200/500/600) with names, kept in every output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from mvmm.core.errors import InputError


@dataclass(frozen=True)
class LabelSet:
    """Ordered tissue classes: ``names[k]`` has label value ``values[k]`` in label maps.

    The background is the class with value 0 if there is one, else the first class.
    """

    names: Tuple[str, ...]
    values: Tuple[int, ...]

    def __post_init__(self):
        if len(self.names) != len(self.values):
            raise InputError(f"labels: {len(self.names)} names for {len(self.values)} values")
        if len(self.values) < 2:
            raise InputError(f"labels: need at least two classes, got {list(self.names)}")
        if len(set(self.values)) != len(self.values) or len(set(self.names)) != len(self.names):
            raise InputError(f"labels: names and values must be unique, got {self.as_dict()}")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def background_index(self) -> int:
        return self.values.index(0) if 0 in self.values else 0

    @property
    def foreground(self) -> Tuple[Tuple[str, int], ...]:
        """(name, value) of every class except the background."""
        bg = self.background_index
        return tuple((n, v) for k, (n, v) in enumerate(zip(self.names, self.values)) if k != bg)

    def index(self, name: str, argname: str = "labels") -> int:
        if name not in self.names:
            raise InputError(f"{argname}: unknown tissue {name!r}; known: {', '.join(self.names)}")
        return self.names.index(name)

    def as_dict(self) -> dict:
        return dict(zip(self.names, self.values))

    @classmethod
    def parse(cls, text: str, argname: str = "labels") -> "LabelSet":
        """Parse ``"bg=0,Myo=200,LV=500,RV=600"`` (order kept)."""
        names, values = [], []
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise InputError(f"{argname}: expected NAME=VALUE items separated by commas, got {item!r}")
            try:
                values.append(int(value))
            except ValueError:
                raise InputError(f"{argname}: label value of {name.strip()!r} must be an integer, "
                                 f"got {value!r}") from None
            names.append(name.strip())
        return cls(tuple(names), tuple(values))

    @classmethod
    def from_dict(cls, names_to_values: dict) -> "LabelSet":
        """The inverse of :meth:`as_dict` (order kept), e.g. from a JSON sidecar or params.json."""
        return cls(tuple(names_to_values), tuple(int(v) for v in names_to_values.values()))

    @classmethod
    def from_values(cls, values: Iterable[int]) -> "LabelSet":
        """Label set for the given values: the built-in cardiac names if they match, else the values."""
        values = tuple(sorted(int(v) for v in set(values)))
        if values == CARDIAC_LABELS.values:
            return CARDIAC_LABELS
        return cls(tuple(str(v) for v in values), values)

    def check_values(self, found: Sequence[int], source: str, argname: str) -> None:
        """Raise InputError unless ``found`` label values are exactly this set's values."""
        found_set, own = set(int(v) for v in found), set(self.values)
        if found_set - own:
            raise InputError(f"{argname}: {source} has label values {sorted(found_set - own)} "
                             f"that are not in the label set {self.as_dict()}")
        if own - found_set:
            raise InputError(f"{argname}: label values {sorted(own - found_set)} of the label set "
                             f"{self.as_dict()} do not occur in {source}")


def parse_label_names(text: str, argname: str = "label_names") -> Tuple[LabelSet, Dict[int, int]]:
    """``"RV=1,Myo=2,LV=3"`` (a data set's values named by tissue; a name may take several values,
    e.g. ``"RV=1,Myo=2,LV=3,Myo=200,LV=500,RV=600"`` for two data sets whose values do not collide).

    Returns the classes — ``bg`` (value 0) then the names in order of first mention, each with its
    first value (what label maps written with these classes hold) — and the map of every named value
    (0 included) to its class index.
    """
    names, first, index_of = ["bg"], [0], {0: 0}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = int(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise InputError(f"{argname}: expected NAME=VALUE items (integer values) separated by commas, got {item!r}")
        if number == 0 and names[0] == "bg" and name not in names:  # the background renamed
            names[0] = name
            continue
        if number in index_of and names[index_of[number]] != name:
            raise InputError(f"{argname}: value {number} is named both {names[index_of[number]]!r} and {name!r}")
        if name not in names:
            names.append(name)
            first.append(number)
        index_of[number] = names.index(name)
    if len(names) < 2:
        raise InputError(f"{argname}: name at least one tissue, e.g. RV=1,Myo=2,LV=3")
    return LabelSet(tuple(names), tuple(first)), index_of


def one_hot(array: np.ndarray, labels: LabelSet, source, argname: str, label_names: Optional[str] = None,
            names_argname: str = "label_names") -> np.ndarray:
    """The label map ``array`` as one map per class of ``labels``, in its order: ``[K, *array.shape]`` float32.

    Without ``label_names`` the map holds ``labels``' values, all of them and nothing else (else InputError
    naming ``source`` and ``argname``). With ``label_names`` — ``"RV=1,Myo=2,LV=3"``, the map's own values named
    by tissue (:func:`parse_label_names`; another data set's values, e.g. ACDC's for MS-CMRSeg's classes) —
    its classes are matched to ``labels``' by name and its background to theirs; every value of the map must be
    named and every name must be one of ``labels``' (else InputError naming ``names_argname``). A class the map
    lacks is an empty channel.
    """
    if label_names is None:
        labels.check_values(sorted(label_values(array, source, argname)), source, argname)
        return np.stack([(array == v) for v in labels.values]).astype(np.float32)
    named, index_of = parse_label_names(label_names, names_argname)
    unnamed = sorted(label_values(array, source, argname) - set(index_of))
    if unnamed:
        raise InputError(f"{names_argname}: {source} has label values {unnamed} that {label_names!r} does not name")
    foreign = [n for k, n in enumerate(named.names) if k != named.background_index and n not in labels.names]
    if foreign:
        raise InputError(f"{names_argname}: {', '.join(foreign)} not among the classes {', '.join(labels.names)} "
                         f"(name the map's values by those names)")
    # the class index in ``labels`` of each of ``named``'s classes: by name, the background to the background
    target = {k: labels.background_index if k == named.background_index else labels.names.index(n)
              for k, n in enumerate(named.names)}
    onehot = np.zeros((len(labels),) + array.shape, dtype=np.float32)
    for value, k in index_of.items():
        onehot[target[k]][array == value] = 1.0
    return onehot


CARDIAC_LABELS = LabelSet(("bg", "Myo", "LV", "RV"), (0, 200, 500, 600))
# Myocardial pathology as MyoPS 2020 labels it (scar over oedema where both apply); inside the myocardium.
PATHOLOGY_LABELS = {"oedema": 1220, "scar": 2221}


def label_values(array: np.ndarray, source, argname: str) -> set:
    """The label values of an integer label map; InputError naming ``source`` for NaN or fractional values."""
    if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
        raise InputError(f"{argname}: {source} is not an integer label map (non-integer values)")
    return set(np.unique(array).astype(np.int64).tolist())


def resolve_labels(text: Optional[str]) -> Optional[LabelSet]:
    """The ``--labels`` option: None when not given."""
    return None if text is None else LabelSet.parse(text)
