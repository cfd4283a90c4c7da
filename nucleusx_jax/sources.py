"""Text sources read into documents, streaming (a file is never read whole): text/jsonl/parquet files,
directories and globs, local or URLs (``gs://bucket/data/*.jsonl``, see :mod:`.storage`), HF datasets and the
embedded corpora.

* ``*.txt`` files: one document per blank-line-separated paragraph;
* ``*.jsonl`` files: one document per line, the string field ``text_field``; ``.gz`` and ``.zst`` variants
  of both (``.zst`` needs ``zstandard``);
* ``*.parquet`` files: column ``text_field``, one document per row, read one row group at a time (needs
  ``pyarrow``);
* a directory: every text/jsonl/parquet file under it (sorted), unless it is an HF ``datasets``
  directory written by ``save_to_disk``; a glob pattern: its matches, sorted;
* ``hf:PATH_OR_NAME``: an HF ``datasets`` directory (``load_from_disk``), or a hub name (``load_dataset``
  with ``streaming=True``, needs a network), column ``text_field`` of split ``train`` (or of the only split);
* ``builtin:pydoc``: the embedded corpus, the topics of CPython's ``pydoc_data`` (one document per topic);
  ``builtin:stdlib``: the docstrings of the standard library's modules (one document per module).

Empty documents are skipped.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import glob
import gzip
import io
import itertools
import json
import os
import re
import sysconfig
import tokenize
import zlib
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from . import storage

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl",)
_PARQUET_SUFFIXES = (".parquet",)
_COMPRESSED = (".gz", ".zst")
_COMPRESSION = {".gz": "gzip"}  # fsspec's names, for URLs (.zst is read by _ZstdReader)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!\\)")  # "hf:...", "builtin:...", "s3://..."; not "C:\"


class BadDocument(ValueError):
    """One document of a source cannot be read (the message names the file and line)."""


def _pydoc_documents() -> Iterator[str]:
    """CPython's ``pydoc_data.topics``: ~80 topics, ~460 KB of English documentation of the language."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


# Parts of the standard library that are tests, demos, vendored or installed packages, not documentation.
_STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                "dist-packages", "__pycache__", "__phello__"}


def _documented_nodes(node: ast.AST, header: str) -> Iterator[Tuple[str, ast.AST]]:
    """``node`` and, in source order, the classes and functions defined in its body or in its classes'."""
    yield header, node
    for child in getattr(node, "body", ()):
        if isinstance(child, ast.ClassDef):
            yield from _documented_nodes(child, f"class {child.name}")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"def {child.name}", child


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> Tuple[str, ...]:
    """One document per standard-library module (~500, ~1.7 MB on CPython 3.11): the docstrings of the module,
    its classes, functions and methods in source order, each under a ``module NAME`` / ``class NAME`` /
    ``def NAME`` header line. Parsed with ``ast`` (nothing is imported); a file that does not parse raises."""
    root = sysconfig.get_paths()["stdlib"]
    docs, paths = [], []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]
        paths += [os.path.join(directory, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    for path in sorted(paths):
        rel = os.path.relpath(path, root)
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        module = rel[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
        parts = []
        for header, node in _documented_nodes(tree, f"module {module}"):
            text = ast.get_docstring(node)
            if text:
                parts.append(f"{header}\n{text}")
        if parts:
            docs.append("\n\n".join(parts))
    return tuple(docs)


BUILTIN_SOURCES: Dict[str, Callable[[], Iterable[str]]] = {
    "builtin:pydoc": _pydoc_documents,
    "builtin:stdlib": _stdlib_docstrings,
}


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file (one or more frames; local or a URL); a file that ends inside
    a frame raises ``EOFError`` at its end instead of passing for a shorter file."""

    def __init__(self, path: str):
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs the `zstandard` package: pip install 'nucleusx-jax[data]'") from e
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file, self._frame, self._started = storage.open_file(path, "rb"), self._new(), False
        self._out, self._at = b"", 0  # decompressed bytes, and how many of them were returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            block = self._file.read(1 << 16)
            if not block:
                if self._started and not self._frame.eof:
                    raise EOFError("the compressed data ends inside a zstd frame (the file is truncated)")
                return 0
            out = []
            while block:
                if self._frame.eof:  # the next frame starts
                    self._frame = self._new()
                self._started = True
                out.append(self._frame.decompress(block))
                block = self._frame.unused_data if self._frame.eof else b""
            self._out, self._at = b"".join(out), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: str) -> IO[str]:
    if path.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path)), encoding="utf-8")
    if storage.is_url(path):
        return storage.open_file(path, "rt", compression=_COMPRESSION.get(os.path.splitext(path)[1]))
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Errors of reading ``path`` as ``ValueError`` naming it: bad UTF-8, truncated or corrupt compression."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from e
    except Exception as e:
        if type(e).__name__ == "ZstdError":  # zstandard's, not importable when the package is missing
            raise ValueError(f"{path} is truncated or corrupt: {e}") from e
        raise


def _file_format(path: str, format: str) -> str:
    """``text``, ``jsonl`` or ``parquet`` for a file, from ``format`` or (``auto``) the file name."""
    if format in ("text", "jsonl", "parquet"):
        return format
    if format == "hf":
        raise ValueError(f"format 'hf' needs a directory written by datasets' save_to_disk, got the file {path!r}")
    name = next((path[: -len(c)] for c in _COMPRESSED if path.endswith(c)), path)
    for fmt, suffixes in (("text", _TEXT_SUFFIXES), ("jsonl", _JSONL_SUFFIXES), ("parquet", _PARQUET_SUFFIXES)):
        if name.endswith(suffixes) and (fmt != "parquet" or name == path):
            return fmt
    raise ValueError(
        f"unknown source format: cannot tell the format of {path!r} from its name (known: "
        f"{_TEXT_SUFFIXES + _JSONL_SUFFIXES}, optionally {_COMPRESSED}, and {_PARQUET_SUFFIXES}); "
        f"set the format to 'text', 'jsonl' or 'parquet'"
    )


def _text_documents(path: str) -> Iterator[str]:
    """Blank-line-separated paragraphs, read line by line (a line of spaces and tabs is blank)."""
    lines: List[str] = []
    with _reading(path), _open_text(path) as f:
        for line in itertools.chain(f, [""]):  # "" flushes the last paragraph
            if line.strip(" \t\r\n"):
                lines.append(line)
                continue
            paragraph = "".join(lines).strip("\r\n")
            lines.clear()
            if paragraph.strip():
                yield paragraph


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    """Column ``text_field`` of a parquet file, one row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs the `pyarrow` package: pip install 'nucleusx-jax[data]'") from e
    f = pq.ParquetFile(storage.open_file(path, "rb") if storage.is_url(path) else path)
    if text_field not in f.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {f.schema_arrow.names}); set the text field")
    for group in range(f.num_row_groups):
        for text in f.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            if text.strip():
                yield text


def _jsonl_document(path: str, lineno: int, line: str, text_field: str) -> str:
    """The text of one jsonl line; a bad line raises :class:`BadDocument` naming ``path:lineno``."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadDocument(f"{path}:{lineno}: invalid JSON: {str(e)[:200]}") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record)[:20] if isinstance(record, dict) else type(record).__name__
        raise BadDocument(f"{path}:{lineno}: no field {text_field!r} (record has {keys}); set data.text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadDocument(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
    if "\\ud" in line or "\\uD" in line:  # only a \uXXXX escape can put a surrogate into the decoded text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadDocument(f"{path}:{lineno}: field {text_field!r} is not valid Unicode: a lone surrogate "
                              f"{text[e.start]!r} at character {e.start}") from None
    return text


def _jsonl_documents(path: str, text_field: str, on_bad: Optional[Callable[[str], None]]) -> Iterator[str]:
    with _reading(path), _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = _jsonl_document(path, lineno, line, text_field)
            except BadDocument as e:
                if on_bad is None:
                    raise
                on_bad(str(e))
                continue
            if text.strip():
                yield text


def _is_hf_dataset_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec)


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    """Column ``text_field`` of an HF dataset: a ``save_to_disk`` directory or (with a network) a hub name."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"the source {spec!r} needs the `datasets` package: pip install 'nucleusx-jax[data]'"
        ) from e
    if _looks_like_path(spec):
        path = os.path.expanduser(spec)
        if not os.path.isdir(path) or not _is_hf_dataset_dir(path):
            raise FileNotFoundError(f"{spec!r} is not an HF datasets directory written by save_to_disk")
        ds = datasets.load_from_disk(path)
    else:
        try:
            ds = datasets.load_dataset(spec, streaming=True)
        except Exception as e:  # datasets raises many types for a missing hub name or network
            raise ValueError(
                f"{spec!r} is no local path, and loading it as an HF hub dataset failed (no network, or no such "
                f"dataset): {e}"
            ) from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = sorted(ds)
        if "train" not in ds and len(splits) != 1:
            raise ValueError(f"HF dataset {spec!r} has splits {splits} and no 'train' split; save the one to use")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    if ds.column_names is not None and text_field not in ds.column_names:
        raise ValueError(f"HF dataset {spec!r} has no column {text_field!r} (columns: {ds.column_names}); set data.text_field")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise ValueError(f"HF dataset {spec!r}: column {text_field!r} holds {type(text).__name__}, not strings")
            if text.strip():
                yield text


def _expand_files(source: str, format: str) -> List[str]:
    """The files of a path source: the file itself, a directory's text/jsonl files, or a glob's matches."""
    if storage.isfile(source):
        return [source]
    if storage.isdir(source):
        suffixes = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES
        files = [
            f for f in storage.walk_files(source)
            if not os.path.basename(f).startswith(".")
            and (format in ("text", "jsonl", "parquet") or f.removesuffix(".gz").removesuffix(".zst").endswith(suffixes))
        ]
        if not files:
            raise ValueError(f"the directory {source!r} holds no {suffixes} files (optionally .gz / .zst)")
        return files
    if glob.has_magic(source):
        files = storage.glob_files(source)
        if not files:
            raise FileNotFoundError(f"the pattern {source!r} matches no files")
        return files
    raise FileNotFoundError(f"data source {source!r} does not exist")


def source_size(source: str, format: str = "auto") -> Optional[int]:
    """Bytes of a local file/directory/glob source's files on disk (for progress), or None (hf:, builtin:)."""
    if _SCHEME.match(source) and len(_SCHEME.match(source).group(1)) > 1 and not storage.is_url(source):
        return None
    path = os.path.expanduser(source)
    if not storage.is_url(path) and os.path.isdir(path) and (
            format == "hf" or (format == "auto" and _is_hf_dataset_dir(path))):
        return None
    return sum(storage.size(f) for f in _expand_files(path, format))


def iter_source_documents(source: str, format: str = "auto", text_field: str = "text",
                          on_bad: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """The non-empty documents of one source, in a fixed order. A bad document (a jsonl line that is not
    JSON, lacks the text field or whose text is not valid Unicode) raises :class:`BadDocument`, or, given
    ``on_bad``, is skipped after ``on_bad(message)``. A truncated or corrupt file always raises."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    scheme = None if storage.is_url(source) else _SCHEME.match(source)
    if scheme and scheme.group(1) == "builtin":
        if source not in BUILTIN_SOURCES:
            raise ValueError(f"unknown builtin source {source!r}; available: {sorted(BUILTIN_SOURCES)}")
        yield from (d for d in BUILTIN_SOURCES[source]() if d.strip())
    elif scheme and scheme.group(1) == "hf":
        yield from _hf_documents(source[len("hf:") :], text_field)
    elif scheme and len(scheme.group(1)) > 1:
        raise ValueError(
            f"unknown data source scheme {scheme.group(1)!r} in {source!r}; use builtin:NAME "
            f"({sorted(BUILTIN_SOURCES)}), hf:PATH_OR_NAME, or a file, directory or glob (local or a URL)"
        )
    elif not storage.is_url(source) and os.path.isdir(source) and (format == "hf" or (format == "auto" and _is_hf_dataset_dir(source))):
        yield from _hf_documents(source if _looks_like_path(source) else "./" + source, text_field)
    else:
        for path in _expand_files(os.path.expanduser(source), format):
            fmt = _file_format(path, format)
            if fmt == "text":
                yield from _text_documents(path)
            elif fmt == "jsonl":
                yield from _jsonl_documents(path, text_field, on_bad)
            else:
                yield from _parquet_documents(path, text_field)
