"""Safe output: an output folder is never overwritten without ``force``; files appear atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from mvmm.core.errors import InputError

PathLike = Union[str, os.PathLike]


def prepare_output_dir(path: PathLike, force: bool, argname: str = "out") -> Path:
    """Create ``path`` (and parents), or accept an existing one only when ``force`` is set.

    Raises
    ------
    InputError
        If ``path`` is an existing file, or a non-empty folder and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{argname}: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{argname}: {path} exists and is not empty; nothing was written "
                         f"(use `force` to overwrite its files)")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the file's suffixes so that writers choosing a format by extension
    (SimpleITK, matplotlib) still do. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
