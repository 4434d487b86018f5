"""Per-image, per-tissue Gaussian subtypes, parsed from ``IMAGE:TISSUE=N`` or ``IMAGE:TISSUE=NAME,NAME…`` specs.

A count says how many subtypes a tissue has in an image (``LGE:Myo=2``); names say it and what they
are (``LGE:Myo=normal,scar``: two subtypes, named **in order of increasing mean intensity** in that
image). Names are what pathology is read from (:mod:`mvmm.pathology`): the LGE myocardium's bright
subtype is scar, the T2 myocardium's bright subtype oedema.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np

from mvmm.core.errors import InputError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _items(specs: Iterable[str], argname: str) -> List[Tuple[str, str, str, List[str]]]:
    """``(item, image, tissue, values)`` per item; a bare name after ``…=NAME`` continues its list."""
    items: List[Tuple[str, str, str, List[str]]] = []
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part and ":" not in part and items and not items[-1][3][0].isdigit():
                if not _NAME.fullmatch(part):
                    raise InputError(f"{argname}: subtype name {part!r} must start with a letter "
                                     f"(letters, digits, _ and -)")
                item, image, tissue, values = items[-1]
                items[-1] = (f"{item},{part}", image, tissue, values + [part])
                continue
            target, sep, value = part.partition("=")
            image, colon, tissue = target.partition(":")
            if not sep or not colon or not value.strip():
                raise InputError(f"{argname}: expected IMAGE:TISSUE=N or IMAGE:TISSUE=NAME,NAME..., got {part!r}")
            items.append((part, image.strip(), tissue.strip(), [value.strip()]))
    return items


def subtype_items(specs: Iterable[str], argname: str = "subtypes") -> List[str]:
    """The specs as one ``IMAGE:TISSUE=…`` item each (a name list stays with its item)."""
    return [item for item, *_ in _items(specs, argname)]


def _parse(specs: Iterable[str], image_names: Sequence[str], tissue_names: Sequence[str], argname: str):
    """``[(rows, cols, count, names or None)]`` of every item, checked."""
    out = []
    for item, image, tissue, values in _items(specs, argname):
        if values[0].lstrip("-").isdigit():
            if len(values) > 1:
                raise InputError(f"{argname}: give a count or names in {item!r}, not both")
            n, names = int(values[0]), None
            if n < 1:
                raise InputError(f"{argname}: the count in {item!r} must be at least 1")
        else:
            names = values
            bad = [v for v in names if not _NAME.fullmatch(v)]
            if bad:
                raise InputError(f"{argname}: the count in {item!r} must be an integer, or subtype names that start "
                                 f"with a letter (got {', '.join(map(repr, bad))})")
            if len(set(names)) != len(names):
                raise InputError(f"{argname}: subtype names repeat in {item!r}")
            n = len(names)
        if image != "*" and image not in image_names:
            raise InputError(f"{argname}: unknown image {image!r} in {item!r}; images: {', '.join(image_names)}")
        if tissue != "*" and tissue not in tissue_names:
            raise InputError(f"{argname}: unknown tissue {tissue!r} in {item!r}; tissues: {', '.join(tissue_names)}")
        rows = list(range(len(image_names))) if image == "*" else [list(image_names).index(image)]
        cols = list(range(len(tissue_names))) if tissue == "*" else [list(tissue_names).index(tissue)]
        out.append((rows, cols, n, names))
    return out


def parse_subtypes(specs: Iterable[str], image_names: Sequence[str], tissue_names: Sequence[str],
                   default: Union[int, np.ndarray] = 1, argname: str = "subtypes") -> np.ndarray:
    """Build the ``[N, K]`` array of subtype counts.

    Parameters
    ----------
    specs : iterable of str
        Items ``IMAGE:TISSUE=N`` or ``IMAGE:TISSUE=NAME,NAME…`` (comma-separated lists allowed),
        applied in order; ``*`` stands for every image or every tissue, e.g.
        ``"*:bg=2,LGE:Myo=normal,scar"``.
    image_names, tissue_names : sequence of str
        The N image names and K tissue names.
    default : int or np.ndarray of int, shape [N, K]
        Counts where no spec applies.

    Raises
    ------
    InputError
        For a malformed item, an unknown image or tissue, or a count below 1.
    """
    counts = np.broadcast_to(np.asarray(default, dtype=np.int64), (len(image_names), len(tissue_names))).copy()
    for rows, cols, n, _ in _parse(specs, image_names, tissue_names, argname):
        counts[np.ix_(rows, cols)] = n
    return counts


def parse_subtype_names(specs: Iterable[str], image_names: Sequence[str], tissue_names: Sequence[str],
                        argname: str = "subtypes") -> Dict[str, Dict[str, List[str]]]:
    """The named subtypes: ``{image: {tissue: [names, darkest first]}}`` (a later count drops the names)."""
    names: Dict[str, Dict[str, List[str]]] = {}
    for rows, cols, _, given in _parse(specs, image_names, tissue_names, argname):
        for i in rows:
            for k in cols:
                image, tissue = image_names[i], tissue_names[k]
                if given is None:
                    names.get(image, {}).pop(tissue, None)
                else:
                    names.setdefault(image, {})[tissue] = list(given)
    return {image: by_tissue for image, by_tissue in names.items() if by_tissue}
