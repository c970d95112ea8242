"""Where text comes from: files, folders, globs, JSON Lines, Parquet, saved datasets, and the
built-in corpora (the standard library's sources, and the installed packages' sources).

Every reader yields :class:`Document` objects in a deterministic order. Text is decoded from
raw bytes (no newline translation), so ``text.encode()`` gives back the file's exact bytes.

Document names are location independent: a path is named relative to the parent of what
you passed (a folder ``/data/corpus`` gives ``corpus/a/b.txt``, a file ``/x/y.txt`` gives
``y.txt``, a glob ``/data/*.txt`` gives ``data/z.txt``); a JSON Lines record is
``<file name>:<line number>``. Splits hash these names, so moving a corpus keeps its split.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
import platform
import re
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


def _package_document(name: str, files: list[Path], root: Path, errors: str) -> Document:
    """A built-in corpus document: a module's text, or a package's files joined, each preceded by
    ``# file: <path relative to root>``."""
    if not name.endswith("/"):
        return Document(name, read_text_file(files[0], errors))
    parts = []
    for f in files:
        text = read_text_file(f, errors)
        parts.append(f"# file: {f.relative_to(root).as_posix()}\n{text}")
        if text and not text.endswith("\n"):
            parts.append("\n")
    return Document(name, "".join(parts))


def read_stdlib_corpus(root: Path | None = None, errors: str = "strict") -> Iterator[Document]:
    """Documents of the built-in corpus; package files are joined, each preceded by ``# file: <relpath>``."""
    root = root or stdlib_root()
    for name, files in stdlib_corpus_files(root).items():
        yield _package_document(name, files, root, errors)


# ----------------------------------------------------------------------------- site-packages corpus

BUILTIN_CORPORA = ("stdlib", "site-packages")

# Rules of the site-packages corpus (see `scan_site_packages`). Bump SITE_PACKAGES_RULES whenever
# they change: it is part of the corpus fingerprint, so caches built under old rules are not reused.
SITE_PACKAGES_RULES = 1
SITE_TEST_DIRS = frozenset({"test", "tests", "testdata", "test_data"})  # and every folder named *_tests
SITE_TEST_FILES = frozenset({"conftest.py", "test.py", "tests.py"})  # and test_*.py, *_test.py
SITE_VENDORED_DIRS = frozenset(
    {"_vendor", "vendor", "vendored", "_vendored", "_vendored_packages",
     "third_party", "thirdparty", "extern", "_extern"}
)
SITE_METADATA_SUFFIXES = (".dist-info", ".egg-info")
SITE_SHIMS = frozenset({"_distutils_hack"})  # and every __editable__* finder
SITE_THIS_PACKAGE = "longnet_lightning"
SITE_GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")
SITE_MAX_FILE_BYTES = 1 << 20
SITE_HEADER_BYTES = 2048
# A generated-code note in a file's header (its leading comments and module docstring, within the
# first SITE_HEADER_BYTES), matched per line in lower case after leading comment/quote marks:
# "do not edit/modify", "edits will be lost", a line starting "autogenerated", "auto-generated",
# "automatically generated", "generated by/from", or "this file/code/content/table ... (auto-)generated
# by/from/with". Prose such as "AST nodes generated by the parser" does not match.
SITE_GENERATED_NOTE = re.compile(
    rb"do not (?:edit|modify)|edits will be lost"
    rb"|^(?:auto-?generated|automatically generated|generated (?:by|from|content|code))"
    rb"|\b(?:file|code|content|contents|module|table|mappings?)\b[^.]{0,30}?"
    rb"\b(?:auto-?generated|automatically generated|generated (?:by|from|with))"
)
_DOCSTRING_START = re.compile(rb"^[rRuUbBfF]{0,2}(\"\"\"|'''|\"|')")
_LEADING_MARKS = re.compile(rb"^(?:[ru]{1,2}(?=[\"']))?[\s#*/\"'!=:;-]*")
# Why .py files were left out, in the order the rules apply; the manifest counts every reason (zeros too).
SITE_EXCLUSION_REASONS = (
    "hidden",  # a file or folder whose name starts with '.'
    "metadata",  # inside a .dist-info / .egg-info folder
    "bytecode-cache",  # inside __pycache__
    "this-package",  # longnet_lightning itself (an editable or regular install)
    "shim",  # __editable__* finders, _distutils_hack
    "not-a-package",  # a top-level folder or module whose name is not a Python identifier
    "shadowed",  # a top-level name already taken in an earlier root
    "test-folder",  # inside test/, tests/, testdata/, test_data/ or *_tests/
    "test-file",  # test_*.py, *_test.py, test.py, tests.py, conftest.py
    "vendored",  # inside _vendor/, vendor/, vendored/, _vendored/, _vendored_packages/, third_party/, ...
    "empty",  # 0 bytes
    "too-large",  # above SITE_MAX_FILE_BYTES (1 MiB): almost always data tables
    "generated",  # *_pb2.py, *_pb2_grpc.py, or a header that says so (`is_generated`)
    "not-utf-8",  # bytes that are not UTF-8 (a legacy coding declaration)
    "unreadable",  # a broken link or a file that cannot be opened
    "duplicate",  # the same bytes (sha256) as a file kept earlier in document order
)


def site_packages_roots() -> list[Path]:
    """This interpreter's installed-package folders: purelib, platlib and ``site.getsitepackages()``,
    those that exist, de-duplicated (by resolved path) and sorted."""
    import site

    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    candidates += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    out: dict[str, Path] = {}
    for c in candidates:
        path = Path(c)
        if path.is_dir():
            out.setdefault(os.path.realpath(path), _abs(path))
    return sorted(out.values())


def _empty_exclusions() -> dict[str, list[int]]:
    return {r: [0, 0] for r in SITE_EXCLUSION_REASONS}


def _tally(excluded: dict[str, list[int]], reason: str, size: int) -> None:
    excluded[reason][0] += 1
    excluded[reason][1] += size


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _tally_tree(excluded: dict[str, list[int]], reason: str, folder: str) -> None:
    """Count every .py file under an excluded folder against `reason`."""
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            if f.endswith(".py"):
                _tally(excluded, reason, _file_size(os.path.join(dirpath, f)) or 0)


def _folder_reason(name: str) -> str | None:
    if name.startswith("."):
        return "hidden"
    if name == "__pycache__":
        return "bytecode-cache"
    if name.endswith(SITE_METADATA_SUFFIXES):
        return "metadata"
    if name in SITE_TEST_DIRS or name.endswith("_tests"):
        return "test-folder"
    if name in SITE_VENDORED_DIRS:
        return "vendored"
    return None


def _file_reason(name: str, size: int | None) -> str | None:
    """The rules a .py file meets by its name and size alone."""
    if name.startswith("."):
        return "hidden"
    if size is None:
        return "unreadable"
    if name in SITE_TEST_FILES or name.startswith("test_") or name.endswith("_test.py"):
        return "test-file"
    if name.endswith(SITE_GENERATED_SUFFIXES):
        return "generated"
    if size == 0:
        return "empty"
    if size > SITE_MAX_FILE_BYTES:
        return "too-large"
    return None


def _top_level_reason(name: str, is_dir: bool) -> str | None:
    stem = name if is_dir else name[: -len(".py")]
    if name.startswith("."):
        return "hidden"
    if is_dir and name.endswith(SITE_METADATA_SUFFIXES):
        return "metadata"
    if stem == SITE_THIS_PACKAGE:
        return "this-package"
    if stem.startswith("__editable__") or stem in SITE_SHIMS:
        return "shim"
    if is_dir and _folder_reason(name):
        return _folder_reason(name)
    if not stem.isidentifier():
        return "not-a-package"
    return None


@dataclass(frozen=True)
class _SiteFile:
    path: Path
    rel: str  # path relative to its root, '/'-separated
    size: int
    mtime_ns: int


@dataclass
class _SiteCandidates:
    """What the name and size rules keep (no file read yet): enough for a fingerprint."""

    roots: list[Path]
    documents: dict[str, tuple[Path, list[_SiteFile]]]  # name -> (its root, files sorted by rel)
    excluded: dict[str, list[int]]
    metadata_dirs: list[str]  # every .dist-info / .egg-info folder (their names hold the versions)


def _site_packages_candidates(roots: Sequence[Path]) -> _SiteCandidates:
    excluded = _empty_exclusions()
    documents: dict[str, tuple[Path, list[_SiteFile]]] = {}
    metadata_dirs = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"site-packages folder {root} not found; pass data_path explicitly.")
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            is_dir = entry.is_dir()
            if not is_dir and not entry.name.endswith(".py"):
                continue  # compiled extensions, .pth files, READMEs: not Python sources
            if is_dir and entry.name.endswith(SITE_METADATA_SUFFIXES):
                metadata_dirs.append(entry.path)
            name = f"{entry.name}/" if is_dir else entry.name
            reason = _top_level_reason(entry.name, is_dir) or ("shadowed" if name in documents else None)
            if reason is not None:
                if is_dir:
                    _tally_tree(excluded, reason, entry.path)
                else:
                    _tally(excluded, reason, _file_size(entry.path) or 0)
                continue
            files = []
            walk = os.walk(entry.path) if is_dir else [(root, [], [entry.name])]
            for dirpath, dirnames, filenames in walk:
                kept = []
                for d in dirnames:
                    why = _folder_reason(d)
                    if why is None:
                        kept.append(d)
                    else:
                        _tally_tree(excluded, why, os.path.join(dirpath, d))
                dirnames[:] = sorted(kept)
                for f in filenames:
                    if not f.endswith(".py"):
                        continue
                    path = os.path.join(dirpath, f)
                    try:
                        st = os.stat(path)
                    except OSError:
                        st = None
                    why = _file_reason(f, None if st is None else st.st_size)
                    if why is not None:
                        _tally(excluded, why, 0 if st is None else st.st_size)
                        continue
                    rel = os.path.relpath(path, root)
                    files.append(_SiteFile(Path(path), rel.replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
            if files:
                documents[name] = (root, sorted(files, key=lambda s: s.rel))
    return _SiteCandidates(list(roots), dict(sorted(documents.items())), excluded, metadata_dirs)


def _resolve_roots(roots) -> list[Path]:
    if roots is None:
        return site_packages_roots()
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else roots
    return [_abs(Path(r)) for r in roots]


def site_packages_stats(roots: Path | Sequence[Path] | None = None) -> dict:
    """What the site-packages corpus is built from, without reading a file: the rules version,
    the roots, every candidate file's (document, path, size, mtime) and the installed
    distributions' metadata folder names. Used as the corpus fingerprint: installing, removing or
    editing a package changes it."""
    return _candidate_stats(_site_packages_candidates(_resolve_roots(roots)))


def _candidate_stats(c: _SiteCandidates) -> dict:
    return {
        "rules": SITE_PACKAGES_RULES,
        "roots": [str(r) for r in c.roots],
        "files": [(name, str(f.path), f.size, f.mtime_ns) for name, (_, fs) in c.documents.items() for f in fs],
        "distributions": c.metadata_dirs,
    }


def _header_lines(data: bytes) -> Iterator[bytes]:
    """The lines of a file's header: its leading blank and comment lines and its module docstring
    (then comments again), up to the first other line, within the first SITE_HEADER_BYTES."""
    quote, docstring_seen = None, False
    for line in data[:SITE_HEADER_BYTES].split(b"\n"):
        s = line.strip()
        if quote is not None:
            yield s
            if quote in s:
                quote = None
            continue
        if not s or s.startswith(b"#"):
            yield s
            continue
        m = _DOCSTRING_START.match(s)
        if m is None or docstring_seen:
            return
        docstring_seen = True
        yield s
        if len(m.group(1)) == 3 and m.group(1) not in s[m.end():]:
            quote = m.group(1)


def is_generated(data: bytes) -> bool:
    """Whether a Python file's header says it is generated (see SITE_GENERATED_NOTE)."""
    return any(SITE_GENERATED_NOTE.search(_LEADING_MARKS.sub(b"", line.lower())) for line in _header_lines(data))


def _content_reason(data: bytes) -> str | None:
    """The rules a file meets by its content: a generated-code note in its header, bytes not UTF-8."""
    if is_generated(data):
        return "generated"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not-utf-8"
    return None


def _installed_paths(dist) -> Iterator[str]:
    """The '/'-separated paths, relative to its root, of the files a distribution installed: its
    RECORD read directly (``dist.files`` builds a path object per line, ~10x slower), else ``dist.files``."""
    record = dist.read_text("RECORD")
    if record:
        for row in csv.reader(record.splitlines()):
            if row and not row[0].startswith(("../", "./", "/")):
                yield row[0]
        return
    for f in dist.files or ():
        if f.parts and f.parts[0] not in ("..", "."):
            yield f.as_posix()


def _distribution_owners(root: Path, documents: set[str]) -> dict[str, list[tuple[int, int, str, str]]]:
    """{document: [(its .py files owned, its files owned, distribution, version), ...]} for the
    distributions installed in `root`, through their RECORD (``dist.files``), else ``top_level.txt``."""
    from importlib import metadata

    dists = []
    for dist in metadata.distributions(path=[str(root)]):
        try:
            name, version = dist.metadata["Name"], dist.version
        except Exception:  # a damaged metadata folder names no distribution
            continue
        if name:
            dists.append((name, version, dist))
    owners: dict[str, list[tuple[int, int, str, str]]] = {}
    seen = set()
    for name, version, dist in sorted(dists, key=lambda d: (d[0].lower(), d[1])):
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        counts: dict[str, list[int]] = {}
        for path in _installed_paths(dist):
            top, sep, _ = path.partition("/")
            doc = f"{top}/" if sep else top
            if doc in documents:
                c = counts.setdefault(doc, [0, 0])
                c[0] += path.endswith(".py")
                c[1] += 1
        if not counts:
            for top in (dist.read_text("top_level.txt") or "").split():
                for doc in (f"{top}/", f"{top}.py"):
                    if doc in documents:
                        counts.setdefault(doc, [0, 0])
        for doc, (py, n) in counts.items():
            owners.setdefault(doc, []).append((py, n, name, version))
    return owners


@dataclass
class SitePackagesManifest:
    """What the site-packages corpus holds: per document its distribution and version, files and
    bytes; per exclusion rule the files and bytes it left out; the roots and the Python version."""

    python: str
    roots: list[str]
    documents: list[dict]  # {name, distribution, version, files, bytes[, shared_with]}
    excluded: dict[str, dict[str, int]]  # reason -> {files, bytes}
    rules: int = SITE_PACKAGES_RULES

    @property
    def n_files(self) -> int:
        return sum(d["files"] for d in self.documents)

    @property
    def n_bytes(self) -> int:
        return sum(d["bytes"] for d in self.documents)

    def summary(self) -> str:
        """One line: documents, files, MB, distributions, and the files each rule left out."""
        dists = {d["distribution"] for d in self.documents if d["distribution"]}
        dists |= {other.split("==")[0] for d in self.documents for other in d.get("shared_with", ())}
        left = ", ".join(f"{r} {e['files']}" for r, e in self.excluded.items() if e["files"])
        return (
            f"site-packages corpus (Python {self.python}): {len(self.documents)} documents from "
            f"{len(dists)} distributions, {self.n_files} files, {self.n_bytes / 1e6:.1f} MB; "
            f"left out {sum(e['files'] for e in self.excluded.values())} files ({left or 'none'})"
        )

    @classmethod
    def from_dict(cls, d: dict) -> SitePackagesManifest:
        """Back from `to_dict` (e.g. a token cache's manifest.json)."""
        return cls(d["python"], list(d["roots"]), list(d["documents"]), dict(d["excluded"]), d.get("rules", 0))

    def to_dict(self) -> dict:
        return {
            "corpus": "site-packages",
            "python": self.python,
            "rules": self.rules,
            "roots": self.roots,
            "n_documents": len(self.documents),
            "n_files": self.n_files,
            "bytes": self.n_bytes,
            "excluded": self.excluded,
            "documents": self.documents,
        }


@dataclass
class SitePackagesScan:
    """The site-packages corpus: {document: files in reading order}, each document's root, and the manifest."""

    files: dict[str, list[Path]]
    roots: dict[str, Path]
    manifest: SitePackagesManifest


def scan_site_packages(roots: Path | Sequence[Path] | None = None) -> SitePackagesScan:
    """Select the site-packages corpus: the .py sources of the installed packages in `roots`
    (default `site_packages_roots()`), read once to apply the content rules.

    One document per top-level package folder, named ``<package>/`` (all its .py files,
    subpackages included, sorted by path); a top-level module ``x.py`` is its own document.
    Left out, each counted under its reason in ``manifest.excluded`` (SITE_EXCLUSION_REASONS):
    hidden entries, .dist-info/.egg-info and __pycache__ folders, longnet_lightning itself, the
    __editable__* / _distutils_hack shims, names that are not identifiers, a name already taken in an
    earlier root; at any depth, test folders (test, tests, testdata, test_data, *_tests; ``testing``
    is kept: numpy.testing, torch.testing are library code) and test files (test_*.py, *_test.py,
    test.py, tests.py, conftest.py), vendored copies (_vendor, vendor, vendored, _vendored,
    _vendored_packages, third_party, thirdparty, extern, _extern), empty files, files above 1 MiB,
    generated files (*_pb2.py, *_pb2_grpc.py, or a header saying so: "generated by ...",
    "autogenerated", "auto-generated", "DO NOT EDIT" ..., see `is_generated`), files that are not
    UTF-8, and files whose exact bytes (sha256) were kept earlier (documents in name order, files in
    path order). Only .py files are sources: compiled extensions, stubs and data files are not read.
    """
    return _scan_candidates(_site_packages_candidates(_resolve_roots(roots)))


def _scan_candidates(c: _SiteCandidates) -> SitePackagesScan:
    """Apply the content rules to the candidates and map documents to distributions."""
    excluded = {r: list(v) for r, v in c.excluded.items()}
    seen: set[bytes] = set()
    files: dict[str, list[Path]] = {}
    sizes: dict[str, int] = {}
    for name, (_, cands) in c.documents.items():
        for f in cands:
            try:
                data = f.path.read_bytes()
            except OSError:
                _tally(excluded, "unreadable", f.size)
                continue
            reason = _content_reason(data)
            if reason is None:
                digest = hashlib.sha256(data).digest()
                reason = "duplicate" if digest in seen else None
                seen.add(digest)
            if reason is not None:
                _tally(excluded, reason, len(data))
                continue
            files.setdefault(name, []).append(f.path)
            sizes[name] = sizes.get(name, 0) + len(data)
    doc_roots = {name: c.documents[name][0] for name in files}
    owners: dict[str, list[tuple[int, int, str, str]]] = {}
    for root in c.roots:
        owners.update(_distribution_owners(root, {n for n, r in doc_roots.items() if r == root}))
    entries = []
    for name, fs in files.items():
        ranked = sorted(owners.get(name, []), key=lambda o: (-o[0], -o[1], o[2].lower()))
        entry = {
            "name": name,
            "distribution": ranked[0][2] if ranked else None,
            "version": ranked[0][3] if ranked else None,
            "files": len(fs),
            "bytes": sizes[name],
        }
        if len(ranked) > 1:
            entry["shared_with"] = [f"{o[2]}=={o[3]}" for o in ranked[1:]]
        entries.append(entry)
    manifest = SitePackagesManifest(
        python=platform.python_version(),
        roots=[str(r) for r in c.roots],
        documents=entries,
        excluded={r: {"files": n, "bytes": b} for r, (n, b) in excluded.items()},
    )
    return SitePackagesScan(files, doc_roots, manifest)


def site_packages_corpus_files(roots: Path | Sequence[Path] | None = None) -> dict[str, list[Path]]:
    """The site-packages corpus as {document name: its .py files in reading order} (see
    `scan_site_packages` for the rules; its ``manifest`` counts what each rule left out)."""
    return scan_site_packages(roots).files


def read_site_packages_corpus(
    roots: Path | Sequence[Path] | None = None, errors: str = "strict", scan: SitePackagesScan | None = None
) -> Iterator[Document]:
    """Documents of the site-packages corpus (from `scan` when given); a package's files are
    joined, each preceded by ``# file: <path relative to its root>``, as in the stdlib corpus."""
    scan = scan or scan_site_packages(roots)
    for name, files in scan.files.items():
        yield _package_document(name, files, scan.roots[name], errors)


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
