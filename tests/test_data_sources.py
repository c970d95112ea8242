"""Reading documents: files, folders, globs, JSON Lines, errors, and the built-in stdlib corpus."""

import json

import pytest

from longnet_lightning.data import Corpus, SplitSpec, build_token_cache, read_documents, stdlib_corpus_files
from longnet_lightning.data.sources import STDLIB_EXCLUDED_PACKAGES
from longnet_lightning.data.tokenizers import ByteTokenizer


def docs(*args, **kw):
    return {d.name: d.text for d in read_documents(*args, **kw)}


def test_folder_is_walked_recursively_sorted_skipping_hidden_and_pycache(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "b.txt").write_bytes(b"windows\r\nline\r\n")
    (root / "sub" / "a.py").write_text("x = 1\n")
    (root / ".hidden").write_text("secret")
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xff\x00")
    got = list(read_documents(str(root)))
    assert [d.name for d in got] == ["corpus/b.txt", "corpus/sub/a.py"]
    assert got[0].text == "windows\r\nline\r\n"  # exact bytes, no newline translation


def test_files_and_globs_are_named_relative_to_what_was_given(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    for n in ["x.md", "y.md", "z.txt"]:
        (tmp_path / "d" / n).write_text(n)
    monkeypatch.chdir(tmp_path)
    assert docs(["d/*.md", str(tmp_path / "d" / "z.txt")]) == {"d/x.md": "x.md", "d/y.md": "y.md", "z.txt": "z.txt"}
    # a file reached twice is read once, named after the first argument that reached it
    assert docs(["d/x.md", "d/*.md"]) == {"x.md": "x.md", "d/y.md": "y.md"}


def test_jsonl_one_document_per_line(tmp_path):
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"body": "héllo"}) + "\n\n" + json.dumps({"body": "two", "id": 2}) + "\n")
    assert docs(str(f), text_field="body") == {"set.jsonl:1": "héllo", "set.jsonl:3": "two"}
    (tmp_path / "plain.txt").write_text(json.dumps({"text": "forced"}) + "\n")
    assert docs(str(tmp_path / "plain.txt"), format="jsonl") == {"plain.txt:1": "forced"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"set\.jsonl:2: not valid JSON"),
        ('{"title": "t"}', r"set\.jsonl:2: record has no field 'text' \(found: \['title'\]\); set text_field"),
        ('["text"]', r"set\.jsonl:2: record has no field 'text'"),
        ('{"text": 5}', r"set\.jsonl:2: field 'text' is int"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "set.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        docs(str(f))


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt' does not exist"):
        docs(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.xyz' matches no file"):
        docs(str(tmp_path / "*.xyz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no files"):
        docs(str(tmp_path / "empty"))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="no documents found"):
        docs(str(tmp_path / "blank.jsonl"))


def test_bad_settings(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="format='xml'"):
        docs(str(tmp_path / "a.txt"), format="xml")
    with pytest.raises(ValueError, match="errors='ignore'"):
        docs(str(tmp_path / "a.txt"), errors="ignore")


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok\n\xff tail")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 at byte offset 9 .*errors='replace'"):
        docs(str(tmp_path / "bad.txt"))
    assert docs(str(tmp_path / "bad.txt"), errors="replace") == {"bad.txt": "café ok\n\ufffd tail"}
    # in JSON Lines the offset counts from the start of the file, not of the line
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xfe"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl \(line 2\): not valid UTF-8 at byte offset 24"):
        docs(str(tmp_path / "bad.jsonl"))


def test_default_corpus_is_the_stdlib_without_tests_and_generated_code(tmp_path):
    files = stdlib_corpus_files()
    names = list(files)
    assert len(names) > 100 and names == sorted(names)
    assert "asyncio/" in names and "argparse.py" in names
    excluded = STDLIB_EXCLUDED_PACKAGES | {"test", "site-packages"}
    assert not any(n.rstrip("/") in excluded for n in names)
    paths = [str(p) for fs in files.values() for p in fs]
    assert not any("/test/" in p or "/tests/" in p or "site-packages" in p or "_sysconfigdata_" in p for p in paths)

    first = next(d for d in read_documents(None) if d.name == "asyncio/")
    assert first.text.startswith("# file: asyncio/__init__.py\n")
    assert "\n# file: asyncio/base_events.py\n" in first.text

    # building the byte cache twice (fresh folders) gives the same deterministic split
    splits = []
    for i in range(2):
        cache = build_token_cache(Corpus(None), ByteTokenizer(), SplitSpec(), tmp_path / f"c{i}")
        splits.append({s: cache.split(s).names for s in ("train", "val", "test")})
    assert splits[0] == splits[1]
    assert sum(len(v) for v in splits[0].values()) == len(names)
    assert all(splits[0][s] for s in ("train", "val", "test"))


# ----------------------------------------------------------------------------- Parquet and saved datasets


def test_parquet_reads_like_json_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from longnet_lightning.data.sources import read_documents

    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "body": ["first", "second é", "third"]}), path)
    docs = list(read_documents(path, text_field="body"))
    assert [d.text for d in docs] == ["first", "second é", "third"]
    assert [d.name for d in docs] == ["part.parquet:0", "part.parquet:1", "part.parquet:2"]
    with pytest.raises(ValueError, match=r"has no column 'text' \(found: \['body', 'id'\]\); set text_field"):
        list(read_documents(path))


def test_hf_dataset_saved_to_disk_reads_like_json_lines(tmp_path):
    datasets = pytest.importorskip("datasets")
    from longnet_lightning.data.sources import read_documents

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(str(folder))
    docs = list(read_documents(folder))
    assert [d.text for d in docs] == ["a b", "c d"] and docs[0].name == "ds:0"


def test_a_missing_extra_is_one_line(tmp_path, monkeypatch):
    import sys

    from longnet_lightning.data.sources import read_documents

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    for path, extra in ((tmp_path / "x.parquet", "parquet"), (tmp_path / "ds", "hf")):
        with pytest.raises(ValueError, match=rf"pip install 'longnet-lightning\[{extra}\]'"):
            list(read_documents(path))


def test_a_damaged_parquet_file_is_one_line(tmp_path):
    pytest.importorskip("pyarrow")
    from longnet_lightning.data.sources import read_documents

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"x.parquet' is not a readable Parquet file"):
        list(read_documents(tmp_path / "x.parquet"))
