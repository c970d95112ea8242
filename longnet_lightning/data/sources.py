"""Where text comes from: files, folders, globs, JSON Lines, and the built-in stdlib corpus.

Every reader yields :class:`Document` objects in a deterministic order. Text is decoded from
raw bytes (no newline translation), so ``text.encode()`` gives back the file's exact bytes.

Document names are location independent: a path is named relative to the parent of what
you passed (a folder ``/data/corpus`` gives ``corpus/a/b.txt``, a file ``/x/y.txt`` gives
``y.txt``, a glob ``/data/*.txt`` gives ``data/z.txt``); a JSON Lines record is
``<file name>:<line number>``. Splits hash these names, so moving a corpus keeps its split.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
# Files written by ``datasets.Dataset(Dict).save_to_disk``: a folder holding one is one source.
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
EXTRAS = {"parquet": ("pyarrow", "parquet"), "hf": ("datasets", "hf")}
ERRORS = ("strict", "replace")

# Skipped while walking folders: hidden entries and Python's bytecode caches.
_SKIP_DIRS = {"__pycache__"}

# The built-in corpus: the standard library's own .py sources, minus tests, vendored
# packages and machine-generated files (see `stdlib_corpus_files`).
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})
STDLIB_EXCLUDED_PACKAGES = frozenset(
    {
        "idlelib",  # the IDLE application
        "lib2to3",  # deprecated converter with its own grammar tables and tests
        "turtledemo",  # demo scripts
        "pydoc_data",  # generated help topics (one ~700 kB string)
        "encodings",  # generated codec tables
        "__phello__",  # frozen-module test fixture
        "lib-dynload",  # compiled extensions
    }
)
STDLIB_EXCLUDED_MODULE_PREFIXES = ("_sysconfigdata_", "__hello__")  # machine-generated / test fixture


@dataclass(frozen=True)
class Document:
    """One unit of text; windows never cross documents unless packing is on."""

    name: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    """A concrete file to read, with the name its documents get and its format ('text' or 'jsonl')."""

    path: Path
    name: str
    format: str


def _check_choice(setting: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not supported; use one of {list(choices)}.")


def _file_format(path: Path, format: str) -> str:
    """'jsonl', 'parquet' or 'text' for one file; with format='auto' decided by the suffix."""
    if format == "auto":
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")
    return format


def is_hf_dataset_dir(path: Path) -> bool:
    """True for a folder written by Hugging Face ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _walk(root: Path) -> Iterator[Path]:
    """All regular files under root, recursively, sorted, skipping hidden entries and __pycache__."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def _abs(path: Path) -> Path:
    """Absolute, normalised path without resolving symlinks (so names stay under the folder given)."""
    return Path(os.path.abspath(path))


def _glob_base(pattern: str) -> Path:
    """The longest leading part of a glob pattern without wildcards (the folder names are relative to)."""
    parts = Path(pattern).parts
    n = next((i for i, p in enumerate(parts) if globlib.has_magic(p)), len(parts))
    return Path(*parts[:n]) if n else Path(".")


def resolve_sources(paths: str | os.PathLike | Sequence[str | os.PathLike], format: str = "auto") -> list[SourceFile]:
    """Expand files, folders (recursive) and glob patterns into a sorted, de-duplicated file list.

    Raises FileNotFoundError for a path that does not exist or a glob that matches no file.
    """
    _check_choice("format", format, FORMATS)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError(
            "data_path is an empty list; give at least one file, folder or glob (or None for the default corpus)."
        )
    out: dict[Path, SourceFile] = {}
    for p in paths:
        spelled = os.fspath(p)
        expanded = os.path.expanduser(spelled)
        if globlib.has_magic(expanded):
            matches = sorted(Path(m) for m in globlib.glob(expanded, recursive=True))
            files = [f for m in matches for f in ([m] if m.is_file() else _walk(m))]
            if not files:
                raise FileNotFoundError(f"data_path glob {spelled!r} matches no file (cwd: {os.getcwd()}).")
            anchor = _abs(_glob_base(expanded)).parent
        else:
            path = Path(expanded)
            if not path.exists():
                raise FileNotFoundError(f"data_path {spelled!r} does not exist (cwd: {os.getcwd()}).")
            if format in ("auto", "hf") and is_hf_dataset_dir(path):
                full = _abs(path)
                out.setdefault(full, SourceFile(full, full.name, "hf"))
                continue
            files = list(_walk(path)) if path.is_dir() else [path]
            if not files:
                raise FileNotFoundError(f"data_path folder {spelled!r} contains no files.")
            anchor = _abs(path).parent
        for f in files:
            full = _abs(f)
            out.setdefault(full, SourceFile(full, full.relative_to(anchor).as_posix(), _file_format(full, format)))
    return sorted(out.values(), key=lambda s: (s.name, str(s.path)))


def decode_bytes(data: bytes, where: str, errors: str = "strict", offset: int = 0) -> str:
    """UTF-8 text of `data`; on bad bytes (errors='strict') a ValueError naming `where` and the byte offset."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason}). "
            "Convert the file to UTF-8, leave it out of data_path, or set errors='replace' "
            "to substitute U+FFFD for the bad bytes."
        ) from None


def read_text_file(path: Path, errors: str = "strict") -> str:
    """The whole file as one UTF-8 string (exact bytes, no newline translation)."""
    return decode_bytes(path.read_bytes(), str(path), errors)


def read_jsonl_file(source: SourceFile, text_field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """One Document per non-blank line of a JSON Lines file, text taken from `text_field`."""
    offset = 0
    with open(source.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{source.path}:{lineno}"
            line = decode_bytes(raw, f"{source.path} (line {lineno})", errors, offset)
            offset += len(raw)
            if not line.strip():
                continue  # blank lines separate nothing; they are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{where}: record has no field {text_field!r} (found: {fields}); "
                    "set text_field to the field holding the text."
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string.")
            yield Document(f"{source.name}:{lineno}", text)


def _import_extra(format: str, source: SourceFile):
    """The optional library a format needs, or a one-line error saying which extra installs it."""
    import importlib

    module, extra = EXTRAS[format]
    try:
        return importlib.import_module("pyarrow.parquet" if module == "pyarrow" else module)
    except ImportError:
        raise ValueError(
            f"data_path {str(source.path)!r} is {'a Parquet file' if format == 'parquet' else 'a Hugging Face dataset'}"
            f" and reading it needs {module}: pip install 'longnet-lightning[{extra}]' (or pip install {module})"
        ) from None


def _text_values(source: SourceFile, values, text_field: str, row0: int = 0) -> Iterator[Document]:
    for i, text in enumerate(values, row0):
        if not isinstance(text, str):
            raise ValueError(f"{source.path} row {i}: field {text_field!r} is {type(text).__name__}, expected a string.")
        yield Document(f"{source.name}:{i}", text)


def _missing_field(source: SourceFile, text_field: str, columns) -> ValueError:
    return ValueError(f"{source.path}: has no column {text_field!r} (found: {sorted(columns)}); "
                      "set text_field to the column holding the text.")


def read_parquet_file(source: SourceFile, text_field: str = "text") -> Iterator[Document]:
    """One Document per row of a Parquet file (the ``text_field`` column), through pyarrow."""
    pq = _import_extra("parquet", source)
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError on a damaged or foreign file
        raise ValueError(f"data_path {str(source.path)!r} is not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise _missing_field(source, text_field, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        values = batch.column(0).to_pylist()
        yield from _text_values(source, values, text_field, row)
        row += len(values)


def read_hf_dataset(source: SourceFile, text_field: str = "text") -> Iterator[Document]:
    """One Document per row of a dataset saved with ``save_to_disk`` (every split of a
    DatasetDict, in sorted order, named ``<folder>/<split>:<row>``), through ``datasets``."""
    datasets = _import_extra("hf", source)
    ds = datasets.load_from_disk(str(source.path))
    parts = sorted(ds.items()) if isinstance(ds, dict) or hasattr(ds, "keys") else [(None, ds)]
    for split, part in parts:
        if text_field not in part.column_names:
            raise _missing_field(source, text_field, part.column_names)
        named = source if split is None else SourceFile(source.path, f"{source.name}/{split}", source.format)
        yield from _text_values(named, (r[text_field] for r in part.select_columns([text_field])), text_field)


def read_source(source: SourceFile, text_field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """The documents of one resolved file (or saved Hugging Face dataset folder)."""
    if source.format == "jsonl":
        yield from read_jsonl_file(source, text_field, errors)
    elif source.format == "parquet":
        yield from read_parquet_file(source, text_field)
    elif source.format == "hf":
        yield from read_hf_dataset(source, text_field)
    else:
        yield Document(source.name, read_text_file(source.path, errors))


# ----------------------------------------------------------------------------- built-in corpus


def stdlib_root() -> Path:
    """This interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(root: Path | None = None) -> dict[str, list[Path]]:
    """The built-in corpus as {document name: its .py files in sorted order}.

    A top-level package (a folder under the stdlib root, subpackages included) is one document
    named ``<package>/``; a top-level module ``x.py`` is its own document named ``x.py``.
    Excluded: folders named test/tests/idle_test/__pycache__/site-packages/dist-packages at any
    depth, hidden entries, the packages in STDLIB_EXCLUDED_PACKAGES (idlelib, lib2to3, turtledemo,
    pydoc_data, encodings, __phello__, lib-dynload), config-* build folders, and modules starting
    with STDLIB_EXCLUDED_MODULE_PREFIXES (_sysconfigdata_*, __hello__).
    """
    root = root or stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder {root} not found; pass data_path explicitly.")
    docs: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_dir():
            if name in STDLIB_EXCLUDED_DIRS or name in STDLIB_EXCLUDED_PACKAGES or name.startswith("config-"):
                continue
            files = []
            for dirpath, dirnames, filenames in os.walk(entry):
                dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("."))
                files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
            if files:
                docs[f"{name}/"] = sorted(files, key=lambda p: p.relative_to(root).as_posix())
        elif name.endswith(".py") and not name.startswith(STDLIB_EXCLUDED_MODULE_PREFIXES):
            docs[name] = [entry]
    return docs


def read_stdlib_corpus(root: Path | None = None, errors: str = "strict") -> Iterator[Document]:
    """Documents of the built-in corpus; package files are joined, each preceded by ``# file: <relpath>``."""
    root = root or stdlib_root()
    for name, files in stdlib_corpus_files(root).items():
        if not name.endswith("/"):
            yield Document(name, read_text_file(files[0], errors))
            continue
        parts = []
        for f in files:
            text = read_text_file(f, errors)
            parts.append(f"# file: {f.relative_to(root).as_posix()}\n{text}")
            if text and not text.endswith("\n"):
                parts.append("\n")
        yield Document(name, "".join(parts))


def read_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    format: str = "auto",
    text_field: str = "text",
    errors: str = "strict",
) -> Iterator[Document]:
    """Documents from files, folders (recursive) and globs; ``None`` means the built-in stdlib corpus.

    format: 'auto' (.jsonl files are JSON Lines, everything else plain text), 'text' or 'jsonl'.
    errors: 'strict' raises on bytes that are not UTF-8 (naming file and byte offset);
    'replace' substitutes U+FFFD. Raises ValueError if no document at all is found.
    """
    _check_choice("errors", errors, ERRORS)
    _check_choice("format", format, FORMATS)
    if paths is None:
        docs = read_stdlib_corpus(errors=errors)
    else:
        sources = resolve_sources(paths, format)
        docs = (d for s in sources for d in read_source(s, text_field, errors))
    n = 0
    for doc in docs:
        n += 1
        yield doc
    if n == 0:
        raise ValueError(f"no documents found in data_path={paths!r} (JSON Lines files with only blank lines?).")
