"""Sources (dir, JSONL, Parquet, TFDS/ArrayRecord), bad input, mixtures, holdout, config."""

import collections
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from data_fixtures import (STDLIB, document_tokens, rows_to_documents, stdlib_cfg, tok,  # noqa: F401
                           tokenizer_path)

from sc_jax.config import ConfigError, from_dict
from sc_jax.data import DataConfig, DataError, SourceConfig, make_eval_iterator, make_train_iterator
from sc_jax.data import fim
from sc_jax.data.pretrain import build_document_dataset
from sc_jax.data.sources import open_source
from sc_jax.tokenizer import TokenizerError, iter_corpus_texts


def _write(path, data: bytes | str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def bad_corpus(tmp_path):
    root = tmp_path / "corpus"
    good = "def f(x):\n    return x + 1\n"
    _write(root / "good/a.py", good)
    _write(root / "good/pkg/b.py", "import os\nprint(os.sep)\n")
    _write(root / "good/README.md", "# Title\n\nSome text.\n")
    bad = root / "bad"
    _write(bad / "ok.py", good)
    _write(bad / "undecodable.py", b"x = '\xff\xfe\xfa'\n")
    _write(bad / "binary.py", b"\x00\x01\x02abc\n")
    _write(bad / "empty.py", b"")
    _write(bad / "blank.py", b"   \n\n\t\n")
    _write(bad / "big.py", "x = 1\n" * 200)  # 1200 bytes > max_file_bytes=1000
    _write(bad / "long.py", "x = '" + "a" * 300 + "'\n")  # a line > max_line_length=200
    _write(bad / "lib.min.js", "var a=1;")
    _write(bad / "node_modules/dep/index.js", "module.exports = 1;\n")
    _write(bad / ".hidden.py", good)
    _write(bad / "notes.txt", "not code\n")
    _write(bad / "vanish.py", good)
    os.symlink(str(bad / "does-not-exist.py"), str(bad / "dangling.py"))
    _write(root / "allbad/x.py", b"\x00\x00")
    os.makedirs(root / "emptyrepo")
    return root


def _cfg(root, tokenizer_path, **kw):
    return DataConfig(sources=[SourceConfig(kind="dir", path=str(root))], tokenizer=tokenizer_path,
                      max_file_bytes=1000, max_line_length=200, **kw)


def test_bad_input_is_skipped_and_counted(bad_corpus, tokenizer_path, tok):
    cfg = _cfg(bad_corpus, tokenizer_path, fim_rate=0.5)
    it = make_eval_iterator(cfg, seq_len=64, batch_size=2, seed=0)
    os.remove(bad_corpus / "bad/vanish.py")  # deleted between scan and read
    docs = rows_to_documents(list(it), tok.eos_id)
    st = it.stats()["skipped"]
    expected = {"undecodable": 1, "binary": 2, "empty": 2, "oversized": 1, "long_lines": 1, "vendored": 1,
                "vendored_dir": 1, "hidden": 1, "unreadable": 2, "not_selected": 1, "empty_repo": 2}
    for key, n in expected.items():
        assert st.get(key) == n, (key, st)
    names = sorted(fim.parse_document(d, tok)["repo_name"] for d in docs)
    assert names == ["bad", "good"]
    files = {p for d in docs for p, _, _ in fim.parse_document(d, tok)["files"]}
    assert files == {"a.py", "pkg/b.py", "README.md", "ok.py"}
    # A training run over the same corpus keeps going.
    tr = make_train_iterator(cfg, seq_len=64, batch_size=2, seed=0)
    for _ in range(5):
        next(tr)
    assert tr.stats()["skipped"]["binary"] >= 2


def test_dir_layouts(bad_corpus, tokenizer_path):
    cfg = _cfg(bad_corpus, tokenizer_path)
    src = open_source(SourceConfig(kind="dir", path=str(bad_corpus)), cfg)
    assert [r[0] for r in src.repos] == ["allbad", "bad", "good"]  # auto: subdirectories are repositories
    one = open_source(SourceConfig(kind="dir", path=str(bad_corpus / "good")), cfg)
    assert [r[0] for r in one.repos] == ["good"]  # files at the top: the directory is one repository
    assert one.num_files() == 3
    inc = open_source(SourceConfig(kind="dir", path=str(bad_corpus), include=["go*"]), cfg)
    assert [r[0] for r in inc.repos] == ["good"]
    py = open_source(SourceConfig(kind="dir", path=str(bad_corpus / "good"), languages=["python"]), cfg)
    assert py.num_files() == 2


def test_missing_paths_are_clear_errors(tmp_path, tokenizer_path):
    for kind in ("dir", "jsonl", "parquet", "tfds"):
        cfg = DataConfig(sources=[SourceConfig(kind=kind, path=str(tmp_path / "nope"))], tokenizer=tokenizer_path)
        with pytest.raises(DataError, match="does not exist"):
            make_train_iterator(cfg, seq_len=32, batch_size=1, seed=0)
    os.makedirs(tmp_path / "only_bad")
    _write(tmp_path / "only_bad/x.bin", b"\x00")
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path=str(tmp_path / "only_bad"))], tokenizer=tokenizer_path)
    with pytest.raises(DataError, match="no usable"):
        make_train_iterator(cfg, seq_len=32, batch_size=1, seed=0)
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path=STDLIB + "/json")], tokenizer=str(tmp_path / "t.json"))
    with pytest.raises(TokenizerError, match="does not exist"):
        make_train_iterator(cfg, seq_len=32, batch_size=1, seed=0)
    with pytest.raises(ConfigError, match="sources is empty"):
        make_train_iterator(DataConfig(tokenizer=tokenizer_path), seq_len=32, batch_size=1, seed=0)


def test_all_skipped_training_stream_raises_instead_of_hanging(tmp_path, tokenizer_path):
    _write(tmp_path / "c/r/x.py", "print(1)\n")
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path=str(tmp_path / "c"))], tokenizer=tokenizer_path)
    it = make_train_iterator(cfg, seq_len=32, batch_size=1, seed=0)
    _write(tmp_path / "c/r/x.py", b"\x00")  # the only file turns binary after the scan
    with pytest.raises(DataError, match="every input was skipped"):
        next(it)


STACK_ROWS = [
    {"content": "def a():\n    pass\n", "repo_name": "org/one", "path": "a.py", "language": "Python"},
    {"content": "# One\n", "repo_name": "org/one", "path": "README.md", "language": "Markdown"},
    {"content": "def b():\n    return 2\n", "repo_name": "org/two", "path": "src/b.py", "language": "Python"},
    {"content": "+++[>]", "repo_name": "org/two", "path": "x.bf", "language": "Brainfuck"},  # not selected
    {"content": None, "repo_name": "org/two", "path": "none.py", "language": "Python"},  # malformed
    {"content": "\x00\x01", "repo_name": "org/three", "path": "bin.py", "language": "Python"},  # binary
    {"content": "", "repo_name": "org/three", "path": "e.py", "language": "Python"},  # empty
    {"content": "int main() {}\n", "repo_name": "org/two", "path": "m.cpp", "language": "C++"},
]


def _jsonl(path):
    lines = [json.dumps(r) for r in STACK_ROWS]
    lines[4:4] = ["{not json", "[1, 2]", "", '{"repo_name": "org/x"}', '{"content": 5, "repo_name": "org/x"}']
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


def _parquet(path):
    pq.write_table(pa.Table.from_pylist(STACK_ROWS), str(path), row_group_size=3)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("document", ["repository", "file"])
def test_stack_layout_tables(tmp_path, tokenizer_path, tok, kind, document):
    path = _jsonl(tmp_path / "stack.jsonl") if kind == "jsonl" else _parquet(tmp_path / "stack.parquet")
    cfg = DataConfig(sources=[SourceConfig(kind=kind, path=path)], tokenizer=tokenizer_path, document=document,
                     fim_rate=0.0)
    it = make_eval_iterator(cfg, seq_len=32, batch_size=2, seed=0)
    docs = [fim.parse_document(d, tok) for d in rows_to_documents(list(it), tok.eos_id)]
    st = it.stats()["skipped"]
    if document == "repository":
        assert [d["repo_name"] for d in docs] == ["org/one", "org/two"]
        assert sorted(p for p, _, _ in docs[1]["files"]) == ["m.cpp", "src/b.py"]
        assert st["empty_repo"] == (2 if kind == "jsonl" else 1)  # org/three (and org/x): every file bad
    else:
        assert [d["files"][0][1] for d in docs] == [r["content"] for r in STACK_ROWS if r["path"] in
                                                   ("a.py", "README.md", "src/b.py", "m.cpp")]
    assert st["not_selected"] == 1 and st["binary"] == 1 and st["empty"] == 1
    assert st["malformed"] == (5 if kind == "jsonl" else 1)  # bad lines, missing/non-string/null content


def test_tfds_arrayrecord_round_trip(tmp_path, tokenizer_path):
    from sc_jax.data.tfds_builder import build

    packages = ["json", "dbm", "tomllib"]
    cfg_dir = stdlib_cfg(tokenizer_path, packages=packages)
    ds_path, stats = build(cfg_dir.sources, str(tmp_path / "tfds"), data_config=cfg_dir, quiet=True)
    assert stats["train_repos"] == 3
    assert os.path.isfile(os.path.join(ds_path, "dataset_info.json"))
    for document in ("repository", "file"):
        a = stdlib_cfg(tokenizer_path, packages=packages, document=document)
        b = DataConfig(sources=[SourceConfig(kind="tfds", path=ds_path)], tokenizer=tokenizer_path, document=document)
        docs_a = document_tokens(build_document_dataset(a, seed=1, train=False)[0])
        docs_b = document_tokens(build_document_dataset(b, seed=1, train=False)[0])
        assert docs_a == docs_b  # same records in the same order -> the very same documents
    # The data_dir form works too.
    c = DataConfig(sources=[SourceConfig(kind="tfds", path=str(tmp_path / "tfds"))], tokenizer=tokenizer_path)
    assert len(document_tokens(build_document_dataset(c, seed=1, train=False)[0])) == 3


def test_weighted_mixture(tmp_path, tokenizer_path, tok):
    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": f"Paragraph {i}. Words and more words.\n"}) + "\n" for i in range(50)))
    code = SourceConfig(kind="dir", path=STDLIB, layout="repos", include=["json", "dbm"], weight=0.8)
    nl = SourceConfig(kind="jsonl", path=str(prose), weight=0.2, document="file", fim_rate=0.0, languages=["*"])
    # Weights per document drawn (data.weight_unit=tokens: tests/test_mixture_tokens.py).
    cfg = DataConfig(sources=[code, nl], tokenizer=tokenizer_path, document="file", weight_unit="documents")
    ds, _ = build_document_dataset(cfg, seed=0, train=True)
    kinds = collections.Counter()
    for i in range(200):
        d = ds[i]
        if d is not None:
            kinds["prose" if tok.decode(d["input_ids"][:2]).startswith("Par") else "code"] += 1
    assert kinds["code"] == 160 and kinds["prose"] == 40  # 80:20, deterministic interleaving


def test_holdout_split_is_disjoint_and_complete(tokenizer_path, tok):
    pk = ["json", "html", "wsgiref", "dbm", "tomllib", "zoneinfo", "sqlite3", "urllib", "xmlrpc", "concurrent"]
    names = lambda cfg, train: {fim.parse_document(d, tok)["repo_name"]  # noqa: E731
                                for d in document_tokens(build_document_dataset(cfg, seed=0, train=train)[0][:40])}
    cfg = stdlib_cfg(tokenizer_path, packages=pk, holdout_fraction=0.3)
    train, held = names(cfg, True), names(cfg, False)
    assert train and held and not train & held
    assert train | held == set(pk)


def test_config_from_yaml():
    raw = yaml.safe_load("""
        tokenizer: tok.json
        sources:
          - {kind: dir, path: /code, weight: 0.8}
          - {kind: jsonl, path: /nl.jsonl, weight: 0.2, document: file, fim_rate: 0.0, languages: ["*"]}
        fim_rate: 0.9
        packing: first_fit
        num_workers: 4
    """)
    cfg = from_dict(DataConfig, raw).validate()
    assert isinstance(cfg.sources[1], SourceConfig) and cfg.sources[1].document == "file"
    assert cfg.sources[0].weight == 0.8 and cfg.fim_rate == 0.9 and cfg.repo_orders == 2
    with pytest.raises(ConfigError, match="fim_rate"):
        from_dict(DataConfig, {"fim_rat": 0.5})
    with pytest.raises(ConfigError, match="data.packing"):
        DataConfig(packing="best").validate()
    with pytest.raises(ConfigError, match="kind"):
        DataConfig(sources=[SourceConfig(kind="csv", path="x")]).validate()
    with pytest.raises(ConfigError, match="unknown language"):
        DataConfig(languages=["pythn"]).validate()
    with pytest.raises(ConfigError, match="within"):
        DataConfig(fim_rate=1.5).validate()


# ----------------------------------------------------------------------------- names that are not UTF-8


def _write_bytes_name(root, *parts: bytes, data: str):
    """root/parts...: names as raw bytes (e.g. Latin-1 'café.py' from an old archive): not UTF-8."""
    path = os.path.join(os.fsencode(str(root)), *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode())


@pytest.fixture
def latin1_corpus(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "shop/a.py", "def a():\n    return 1\n")
    _write(root / "shop/pkg/b.py", "def b():\n    return 2\n")
    _write_bytes_name(root, b"shop", b"caf\xe9.py", data="x = 1\n")  # a file name,
    _write_bytes_name(root, b"shop", b"d\xe9p", b"c.py", data="y = 2\n")  # a directory in a repository,
    _write_bytes_name(root, b"r\xe9po", b"ok.py", data="z = 3\n")  # a repository's name
    _write(root / "other/o.py", "print('o')\n")
    return root


def test_a_file_name_that_is_not_utf8_skips_that_file_not_its_repository(latin1_corpus, tokenizer_path, tok):
    cfg = DataConfig(sources=[SourceConfig(kind="dir", path=str(latin1_corpus))], tokenizer=tokenizer_path,
                     fim_rate=0.0)
    it = make_eval_iterator(cfg, seq_len=64, batch_size=2, seed=0)
    docs = [fim.parse_document(d, tok) for d in rows_to_documents(list(it), tok.eos_id)]
    st = it.stats()["skipped"]
    assert "error" not in st, st
    assert st["bad_filename"] == 1 and st["bad_filename_dir"] == 2, st  # café.py; dép/ and the repository répo/
    assert {d["repo_name"]: sorted(p for p, _, _ in d["files"]) for d in docs} == {
        "other": ["o.py"], "shop": ["a.py", "pkg/b.py"]}
    # The file view (document: file) and the tokenizer's corpus reader skip the same names.
    cfg.document = "file"
    files = document_tokens(build_document_dataset(cfg, seed=0, train=False)[0])
    assert len(files) == 3
    stats: dict = {}
    assert len(list(iter_corpus_texts(str(latin1_corpus), stats=stats))) == 3 and stats["bad_filename"] == 1


def test_table_rows_with_lone_surrogate_names_are_skipped(tmp_path, tokenizer_path, tok):
    rows = [{"content": "def a():\n    pass\n", "repo_name": "org/one", "path": "a.py"},
            {"content": "x = 1\n", "repo_name": "org/one", "path": "caf\udce9.py"},  # a bad \u escape in the path
            {"content": "y = 2\n", "repo_name": "org/r\udce9po", "path": "y.py"}]  # ... in the repository name
    path = tmp_path / "stack.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes them as \udce9
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(path))], tokenizer=tokenizer_path, fim_rate=0.0)
    it = make_eval_iterator(cfg, seq_len=64, batch_size=2, seed=0)
    docs = [fim.parse_document(d, tok) for d in rows_to_documents(list(it), tok.eos_id)]
    st = it.stats()["skipped"]
    assert "error" not in st and st["bad_filename"] == 1 and st["bad_repo_name"] == 1, st
    assert [(d["repo_name"], [p for p, _, _ in d["files"]]) for d in docs] == [("org/one", ["a.py"])]


def test_tfds_builder_skips_names_that_are_not_utf8(latin1_corpus, tmp_path, tokenizer_path):
    from sc_jax.data.tfds_builder import build

    cfg = DataConfig(sources=[SourceConfig(kind="dir", path=str(latin1_corpus))])
    ds_path, stats = build(cfg.sources, str(tmp_path / "tfds"), data_config=cfg, quiet=True)
    assert stats["train_repos"] == 2 and stats["train_files"] == 3
    assert stats["bad_filename"] == 1 and stats["bad_filename_dir"] == 2
    back = DataConfig(sources=[SourceConfig(kind="tfds", path=ds_path)], tokenizer=tokenizer_path, document="file")
    assert len(document_tokens(build_document_dataset(back, seed=0, train=False)[0])) == 3


# ----------------------------------------------------------------------------- tfds_builder reruns


def test_tfds_builder_rerun_keeps_refuses_or_overwrites(tmp_path, capsys):
    from sc_jax.data.sources import FileFilter, TfdsSource
    from sc_jax.data.tfds_builder import BUILD_RECORD
    from sc_jax.data.tfds_builder.__main__ import main

    one, two = tmp_path / "one", tmp_path / "two"
    _write(one / "r1/a.py", "def a():\n    return 1\n")
    _write(two / "r2/b.py", "def b():\n    return 2\n")
    _write(two / "r3/c.py", "def c():\n    return 3\n")
    data_dir = str(tmp_path / "tfds")

    def repo_names(path):
        src = TfdsSource(SourceConfig(kind="tfds", path=path), FileFilter(None, None))
        return [src.read_repo(i).name for i in range(src.num_repos())]

    assert main(["--source", f"dir:{one}", "--data-dir", data_dir, "--quiet"]) == 0
    path = capsys.readouterr().out.splitlines()[0].removeprefix("wrote ")
    assert repo_names(path) == ["r1"] and os.path.isfile(os.path.join(path, BUILD_RECORD))
    assert sorted(os.listdir(data_dir)) == ["code_repositories"]  # no TFDS downloads dir, no temporary dir
    # The same sources again: kept, and said so (with the statistics of the build).
    assert main(["--source", f"dir:{one}", "--data-dir", data_dir, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kept {path}") and "train_repos=1" in out and "wrote" not in out
    # Other sources: refused, the old dataset untouched.
    assert main(["--source", f"dir:{two}", "--data-dir", data_dir, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and repo_names(path) == ["r1"]
    # --overwrite rebuilds from the new sources.
    assert main(["--source", f"dir:{two}", "--data-dir", data_dir, "--quiet", "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {path}") and repo_names(path) == ["r2", "r3"]
    assert sorted(os.listdir(data_dir)) == ["code_repositories"]
