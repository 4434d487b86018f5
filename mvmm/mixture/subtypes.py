"""Per-image, per-tissue numbers of Gaussian subtypes, parsed from ``IMAGE:TISSUE=N`` specs."""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np

from mvmm.core.errors import InputError


def parse_subtypes(specs: Iterable[str], image_names: Sequence[str], tissue_names: Sequence[str],
                   default: Union[int, np.ndarray] = 1, argname: str = "subtypes") -> np.ndarray:
    """Build the ``[N, K]`` array of subtype counts.

    Parameters
    ----------
    specs : iterable of str
        Items ``IMAGE:TISSUE=N`` (comma-separated lists allowed), applied in order; ``*`` stands for
        every image or every tissue, e.g. ``"*:bg=2,LGE:Myo=2"``.
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
    for item in (p.strip() for spec in specs for p in spec.split(",")):
        if not item:
            continue
        target, sep, value = item.partition("=")
        image, colon, tissue = target.partition(":")
        if not sep or not colon:
            raise InputError(f"{argname}: expected IMAGE:TISSUE=N, got {item!r}")
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"{argname}: the count in {item!r} must be an integer") from None
        if n < 1:
            raise InputError(f"{argname}: the count in {item!r} must be at least 1")
        image, tissue = image.strip(), tissue.strip()
        if image != "*" and image not in image_names:
            raise InputError(f"{argname}: unknown image {image!r} in {item!r}; images: {', '.join(image_names)}")
        if tissue != "*" and tissue not in tissue_names:
            raise InputError(f"{argname}: unknown tissue {tissue!r} in {item!r}; tissues: {', '.join(tissue_names)}")
        rows = slice(None) if image == "*" else list(image_names).index(image)
        cols = slice(None) if tissue == "*" else list(tissue_names).index(tissue)
        counts[rows, cols] = n
    return counts
