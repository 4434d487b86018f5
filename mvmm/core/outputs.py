"""Safe output, for results people rely on.

- An output folder is never overwritten without ``force``.
- A run writes into a staging folder beside its output folder; every file is verified (read back)
  and only then moved into place. A failed or interrupted run leaves nothing: no half-written file,
  no empty folder, not even the parents it created.
- With ``force``, the files of the previous mvmm run in that folder (listed in its
  :data:`MANIFEST_NAME`) are replaced, so none of them is left stale; other files are kept.
- Files and folders get the permissions the user's umask gives (not ``mkstemp``'s 0600).
- Writing errors (disk full, no permission) become one :class:`OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from mvmm.core.errors import InputError

PathLike = Union[str, os.PathLike]
MANIFEST_NAME = ".mvmm-outputs.json"


class OutputError(OSError):
    """An output could not be written (disk full, no permission, …); the message names the path."""


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output_dir(path: PathLike, force: bool, argname: str = "out") -> Path:
    """Raise InputError unless ``path`` may receive a run's outputs (absent, empty, or ``force``); creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{argname}: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise InputError(f"{argname}: {path} exists and is not empty; nothing was written "
                         f"(use `force` to overwrite its files)")
    return path


def prepare_output_dir(path: PathLike, force: bool, argname: str = "out") -> Path:
    """Create ``path`` (and parents), or accept an existing one only when ``force`` is set.

    For a whole run's outputs prefer :func:`staged_output_dir`, which leaves nothing on failure.

    Raises
    ------
    InputError
        If ``path`` is an existing file, or a non-empty folder and ``force`` is False.
    """
    path = check_output_dir(path, force, argname)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing_ancestors(path: Path) -> List[Path]:
    """``path``'s ancestors that do not exist, outermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return list(reversed(missing))


def _set_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions the umask allows (files 666, folders 777)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def verify_output(path: Path) -> None:
    """Check that a written file reads back whole: JSON parses, a PNG ends with its IEND chunk, no
    file is empty. Raises OutputError."""
    if path.stat().st_size == 0:
        raise OutputError(f"{path} was written empty")
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError as err:
            raise OutputError(f"{path} does not read back as JSON ({err})") from None
    elif path.suffix == ".png":
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(-12, os.SEEK_END)
            tail = f.read()
        if head != b"\x89PNG\r\n\x1a\n" or tail[4:8] != b"IEND":
            raise OutputError(f"{path} is not a complete PNG file")


@contextlib.contextmanager
def staged_output_dir(path: PathLike, force: bool, argname: str = "out",
                      verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a staging folder for a run's outputs; on success they replace the previous run's in ``path``.

    Parameters
    ----------
    path : path
        The output folder (created if absent).
    force : bool
        Accept a non-empty folder: the previous run's files (its manifest) are replaced, others kept.
    argname : str
        The parameter ``path`` came from, for error messages.
    verify : callable, optional
        Called on every written file (e.g. reading an image back); raises on a bad one. The default
        checks JSON, PNG and that no file is empty (:func:`verify_output`).

    Raises
    ------
    InputError
        If ``path`` is taken (see :func:`check_output_dir`).
    OutputError
        If the outputs cannot be written (disk full, permissions); nothing is left behind.
    """
    path = check_output_dir(path, force, argname)
    created = _missing_ancestors(path)
    staging = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        except OSError as err:
            raise OutputError(f"{argname}: cannot create {path} ({err.strerror or err})") from None
        try:
            yield staging
            written = sorted(p for p in staging.rglob("*") if p.is_file())
            for file in written:
                (verify or verify_output)(file)
            _set_permissions(staging)
            _commit(staging, path, written)
        except OSError as err:
            if isinstance(err, OutputError):
                raise
            where = err.filename or path
            raise OutputError(f"{argname}: cannot write {where} ({err.strerror or err}); nothing was "
                              f"written to {path}") from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):  # the parents this run created, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _commit(staging: Path, path: Path, written: List[Path]) -> None:
    """Move the staged outputs into ``path``: the previous run's entries first removed, then ours
    renamed in (each a rename on one file system), then our manifest."""
    existed = path.exists()
    path.mkdir(exist_ok=True)
    if not existed:
        os.chmod(path, 0o777 & ~_umask())
    manifest = path / MANIFEST_NAME
    if manifest.exists():
        with contextlib.suppress(ValueError, OSError):
            for entry in json.loads(manifest.read_text()).get("entries", []):
                old = path / entry
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                elif old.exists() or old.is_symlink():
                    old.unlink()
    entries = sorted(p.name for p in staging.iterdir())
    for name in entries:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    write_json(manifest, {"written_by": "mvmm", "entries": entries})
    staging.rmdir()


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from colleagues
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
