"""Local paths and object-storage URLs (``gs://bucket/key``, or any other fsspec protocol) behind one set of
functions, so that a run directory, a token store or a model directory may live on either.

Local paths keep POSIX semantics: a file is written under a temporary name, fsynced and renamed. Object
storage has no directories and no rename, but a single object is written whole or not at all (GCS makes an
object visible only when its upload completes). So on a URL a file is committed by uploading it as one object
(:func:`atomic_write`), and a directory by uploading every file and its *marker* file last
(:func:`publish_dir`): a reader that finds the marker finds the rest. A URL needs the fsspec backend of its
protocol (``gs://``: gcsfs, the ``gcs`` extra); a missing object raises ``FileNotFoundError`` and an
unreachable or unreadable bucket :class:`StorageError`, both naming the URL.
"""

import contextlib
import fnmatch
import glob
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator, List, Optional, Tuple, Union

import fsspec

from .tensorio import umask


class StorageError(OSError):
    """A storage URL that cannot be reached, listed or read; the message names it and the cause."""


def is_url(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a URL (``protocol://...``) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: Union[str, os.PathLike]) -> str:
    """A URL as given (without a trailing slash); a local path made absolute."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def _fs(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    try:  # no listings cache: other processes (a killed run, its rerun) change the bucket under us
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{url}: no filesystem for this URL ({err}); for gs:// install the gcs extra "
                           "(pip install 'nucleusx-jax[gcs]')") from None


@contextlib.contextmanager
def _named(url: str, action: str) -> Iterator[None]:
    """Re-raise a backend's errors naming ``url``: FileNotFoundError stays one, the rest become StorageError."""
    try:
        yield
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot {action} {url}: no such object ({err})") from err
    except (StorageError, FileExistsError):
        raise
    except Exception as err:  # gcsfs/aiohttp/google-auth raise many types for an unreachable or refused bucket
        raise StorageError(f"cannot {action} {url}: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                           ) from err


def _ask(path: str, local: Callable[[str], Any], method: str, action: str) -> Any:
    """``local(path)`` for a local path, else the filesystem's ``method`` on the URL, errors naming it."""
    if not is_url(path):
        return local(path)
    fs, p = _fs(path)
    with _named(path, action):
        return getattr(fs, method)(p)


def exists(path: str) -> bool:
    """Whether a file or directory (on a URL: an object or a prefix holding some) exists at ``path``."""
    return _ask(path, os.path.exists, "exists", "look up")


def isfile(path: str) -> bool:
    return _ask(path, os.path.isfile, "isfile", "look up")


def isdir(path: str) -> bool:
    return _ask(path, os.path.isdir, "isdir", "look up")


def listdir(path: str) -> List[str]:
    """The names (not paths) in directory ``path``; on a URL the objects and prefixes right below it."""
    if not is_url(path):
        return os.listdir(path)
    fs, p = _fs(path)
    with _named(path, "list"):
        return [os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)]


def size(path: str) -> int:
    """The size of file ``path`` in bytes."""
    return int(_ask(path, os.path.getsize, "size", "stat"))


def makedirs(path: str) -> None:
    """Create directory ``path`` (and parents). On a URL there are no directories: check instead that the
    bucket exists and can be listed, so that a wrong or unreachable bucket fails here, naming the URL."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = _fs(path)
    bucket = p.lstrip("/").split("/", 1)[0]
    with _named(path, f"reach the bucket {bucket!r} of"):
        found = fs.exists(bucket)
    if not found:
        raise FileNotFoundError(f"cannot use {path}: the bucket {bucket!r} does not exist (or these credentials "
                                "cannot see it)")


def remove_tree(path: str) -> None:
    """Delete ``path`` (file or directory tree) if it exists."""
    if not is_url(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, p = _fs(path)
    with _named(path, "delete"):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def open_file(path: str, mode: str = "rb", *, compression: Optional[str] = None) -> IO[Any]:
    """An open file for reading (``mode`` ``"r"``/``"rt"``: UTF-8 text, ``"rb"``: bytes) a local file or an
    object, decompressed by fsspec when ``compression`` (``"gzip"``, ``"zstd"``) is given."""
    if mode not in ("r", "rt", "rb"):
        raise ValueError(f"open_file reads only (mode 'r', 'rt' or 'rb'), got {mode!r}; write with atomic_write")
    encoding = None if "b" in mode else "utf-8"
    if not is_url(path) and compression is None:
        return open(path, mode, encoding=encoding)
    with _named(path, "open"):
        return fsspec.open(path, mode, compression=compression, encoding=encoding, use_listings_cache=False).open()


def _glob_local(pattern: str) -> List[str]:
    """The paths matching the local glob ``pattern`` (``glob.glob``'s rules, ``**`` recursive), except that
    ``**`` never descends into a symlinked directory: a symlink loop cannot multiply or hang the walk."""
    head, parts = ("/" if os.path.isabs(pattern) else ""), [p for p in pattern.split(os.sep) if p]
    paths = [head]
    for i, part in enumerate(parts):
        found: List[str] = []
        for base in paths:
            if part == "**":  # base and every directory below it (last: and their files); symlinked
                start = base or os.curdir  # directories are listed by os.walk, never entered
                for root, dirs, files in os.walk(start):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    here = base if root == start else os.path.join(base, os.path.relpath(root, start))
                    found += [here] + ([os.path.join(here, f) for f in files if not f.startswith(".")]
                                       if i == len(parts) - 1 else [])
            elif glob.has_magic(part):
                try:
                    names = os.listdir(base or os.curdir)
                except OSError:  # not a directory, or unreadable: no matches below it, as glob.glob
                    continue
                hidden = part.startswith(".")
                found += [os.path.join(base, n) for n in fnmatch.filter(names, part) if hidden or not n.startswith(".")]
            elif os.path.lexists(os.path.join(base, part)):
                found.append(os.path.join(base, part))
        paths = found
    return sorted(set(paths) - {""})


def glob_files(pattern: str) -> List[str]:
    """The files matching glob ``pattern`` (``**`` recursive, not through symlinked directories), sorted; URLs
    keep their protocol."""
    if not is_url(pattern):
        return [f for f in _glob_local(pattern) if os.path.isfile(f)]
    fs, p = _fs(pattern)
    with _named(pattern, "list"):
        return sorted(fs.unstrip_protocol(f) for f, info in fs.glob(p, detail=True).items() if info["type"] == "file")


def walk_files(path: str) -> List[str]:
    """Every file under directory ``path`` (recursively), sorted; URLs keep their protocol."""
    if not is_url(path):
        return sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    fs, p = _fs(path)
    with _named(path, "list"):
        return sorted(fs.unstrip_protocol(f) for f in fs.find(p))


def read_bytes(path: str, start: Optional[int] = None, stop: Optional[int] = None) -> bytes:
    """Bytes ``[start, stop)`` of file ``path`` (default: all); on a URL one ranged request."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start or 0)
            return f.read() if stop is None else f.read(stop - (start or 0))
    fs, p = _fs(path)
    with _named(path, "read"):
        return fs.cat_file(p, start=start, end=stop)


def atomic_write(path: str, data: Union[bytes, str, Callable[[IO[bytes]], None]]) -> None:
    """Write ``data`` (bytes, text, or a function writing into the open binary file) so that readers see the
    old file or the whole new one, never a part. Locally: a temporary file next to ``path``, fsynced, then
    renamed into place, with the mode ``open`` would give it (0666 less the umask). On a URL: one object
    upload (written to a local temporary file first when ``data`` is a function), visible only once complete."""
    if is_url(path):
        fs, p = _fs(path)
        if not callable(data):
            with _named(path, "write"):
                fs.pipe_file(p, data.encode() if isinstance(data, str) else data)
            return
        with tempfile.TemporaryDirectory(prefix="nucleusx-upload-") as tmp:
            local = os.path.join(tmp, os.path.basename(p))
            atomic_write(local, data)
            upload_file(local, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes the file private (0600)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def create_new(url: str, data: bytes) -> None:
    """Write ``data`` as object ``url`` only if none exists there, else raise ``FileExistsError``: one
    check-and-create step (on gs:// an upload with the ``ifGenerationMatch=0`` precondition). For URLs only:
    local files have ``O_EXCL`` and ``flock``."""
    fs, p = _fs(url)
    with _named(url, "create"):
        fs.pipe_file(p, data, mode="create")


def upload_file(local: str, path: str) -> None:
    """Commit the complete local file ``local`` as ``path`` (a rename locally, one object upload on a URL)."""
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.replace(local, path)
        return
    fs, p = _fs(path)
    with _named(path, "write"):
        fs.put_file(local, p)


def upload_tree(local: str, path: str) -> None:
    """Commit every file under the local directory ``local`` to the same relative name under ``path``
    (:func:`upload_file` each: moved when ``path`` is local, copied up when it is a URL)."""
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            upload_file(os.path.join(root, name), os.path.join(path, rel))


def publish_dir(local: str, path: str, *, marker: str, stale: Callable[[str], bool] = lambda name: True) -> None:
    """Move the files of the complete local directory ``local`` (flat: files only) into directory ``path`` so
    that a reader finding ``path/marker`` finds all of them: the old marker is deleted first, then the entries
    of ``path`` that ``stale(name)`` selects and ``local`` lacks, then each file is committed
    (:func:`upload_file`: renamed locally, uploaded on a URL), the marker last. ``local`` is consumed."""
    names = sorted(os.listdir(local), key=lambda n: n == marker)
    if marker not in names:
        raise ValueError(f"{local} has no {marker}: nothing to publish as {path}")
    old = listdir(path) if exists(path) else []
    for name in sorted(old, key=lambda n: n != marker):
        if name == marker or (name not in names and stale(name)):
            remove_tree(os.path.join(path, name))
    for name in names:
        upload_file(os.path.join(local, name), os.path.join(path, name))


def forget_cached_listings(url: str) -> None:
    """Drop the directory listings cached by every instance of ``url``'s filesystem in this process (a no-op for
    local paths). This module lists without a cache, but libraries such as orbax (through etils.epath) hold their
    own instances with one: call this after changing a directory behind their back, or before they list a
    directory that other processes changed, so that they see it as it is."""
    if not is_url(url):
        return
    fs, _ = _fs(url)
    for instance in list(type(fs)._cache.values()):  # fsspec's instances of that class (no public accessor)
        instance.invalidate_cache()


def move(path: str, dest: str) -> None:
    """Move the file or directory ``path`` to ``dest`` (replacing it): a rename locally; on a URL a copy, then a
    delete of the original (not atomic: a kill in between leaves both)."""
    remove_tree(dest)
    if not is_url(path):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(path, dest)
        return
    fs, p = _fs(path)
    _, d = _fs(dest)
    with _named(path, f"move to {dest}"):
        fs.copy(p, d, recursive=True)
        fs.rm(p, recursive=True)


def download_dir(path: str, local: str) -> None:
    """Copy the files right below directory URL ``path`` into the local directory ``local``."""
    fs, p = _fs(path)
    os.makedirs(local, exist_ok=True)
    with _named(path, "download"):
        files = [f for f in fs.ls(p, detail=True) if f["type"] == "file"]
        if not files:
            raise FileNotFoundError(f"{path} holds no files")
        fs.get([f["name"] for f in files], [os.path.join(local, os.path.basename(f["name"])) for f in files])
