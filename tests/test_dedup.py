"""Exact-match deduplication of SFT / DPO data: planted duplicates (exact, whitespace-varied,
ShareGPT-spelled, within a file, across files, across sources) are removed, exactly those and
nothing else, by `python -m sc_jax.instruct.dedup` and by `data.dedup` while training scans; the
seen hashes live on disk, so memory stays flat as the corpus grows."""

import json
import os
import subprocess
import sys

import pytest

from cli_harness import REPO, BadInput, run_bad_input
from sc_jax.data import DataConfig, SourceConfig
from sc_jax.instruct import make_instruct_iterator
from sc_jax.instruct.dedup import main as dedup_main
from sc_jax.instruct.duplicates import HashIndex, parse_for_key, record_hash

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "iterator_states", "tokenizer.json")


def conv(user, answer, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def originals() -> list[dict]:
    """40 distinct conversations, some nearly alike: they differ in case, punctuation, a role or
    a turn, none only in whitespace. None may be removed."""
    out = [conv(f"Square {i}?", f"print({i} * {i})") for i in range(30)]
    out += [conv("Square 3!", "print(3 * 3)"), conv("square 3?", "print(3 * 3)"),
            conv("Square 3?", "print(3*3)"), conv("Square 3?", "print(3 * 3)", system="Be brief."),
            {"messages": [{"role": "system", "content": "Square 3?"}, {"role": "assistant", "content": "print(3 * 3)"}]},
            conv("Square 3?", "print(3 * 3) "[:-1] + "."), conv("Sq uare 3?", "print(3 * 3)"),
            {"messages": conv("Square 3?", "print(3 * 3)")["messages"] + [{"role": "user", "content": "Thanks"},
                                                                         {"role": "assistant", "content": "ok"}]},
            conv("Cube 2?", "print(2 ** 3)"), conv("Cube 2?", "print(2 ** 3)", system="Answer in Python.")]
    return out


def spaced(rec: dict) -> dict:
    """The same record with its whitespace changed: runs doubled, newlines and tabs, ends padded."""
    return {"messages": [{"role": m["role"], "content": "  " + m["content"].replace(" ", " \n\t ") + "\n"}
                         for m in rec["messages"]]}


def sharegpt(rec: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in rec["messages"]]}


def write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Source A = two files, source B = one; the planted copies and where they are removed."""
    root = tmp_path_factory.mktemp("dedup")
    base = originals()
    a1 = base[:20] + [base[3], spaced(base[5])]  # exact and whitespace copies in the same file
    a2 = base[20:30] + [base[0], spaced(base[12]), sharegpt(base[7])]  # copies of a1 in the next file
    b = base[30:] + [base[1], spaced(base[25]), sharegpt(spaced(base[31])), base[2], base[2]]  # copies of A, of itself
    (root / "a").mkdir()
    paths = {"a": str(root / "a"), "b": write(root / "b.jsonl", b)}
    write(root / "a" / "1.jsonl", a1)
    write(root / "a" / "2.jsonl", a2)
    # A removes 5 (2 in 1.jsonl, 3 in 2.jsonl); B removes 5 (4 of A's records, 1 of its own).
    return paths, base, {"a": 5, "b": 5}, {"a": 0, "b": 4}


def read_out(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_the_command_removes_exactly_the_planted_duplicates(planted, tmp_path, capsys):
    paths, base, removed, across = planted
    out = tmp_path / "dedup.jsonl"
    assert dedup_main([paths["a"], paths["b"], "--out", str(out)]) == 0
    text = capsys.readouterr().out
    kept = read_out(out)
    assert kept == base  # the first occurrences, in source order
    for label in ("a", "b"):
        line = next(x for x in text.splitlines() if x.startswith(paths[label] + ":"))
        assert f"removed {removed[label]} duplicate(s) ({across[label]} of an earlier input)" in line
    assert "removed 10 of 50 records" in text
    assert f"{paths['b']}:{len(base) - 30 + 1} duplicates {paths['a']}/1.jsonl:2" in text  # b's base[1]


def test_training_scan_removes_the_same_and_counts_them_per_source(planted, capsys):
    paths, base, removed, _ = planted
    srcs = [SourceConfig(kind="jsonl", path=paths[k], name=k) for k in ("a", "b")]
    cfg = DataConfig(sources=srcs, tokenizer=TOKENIZER, dedup=True)
    it = make_instruct_iterator(cfg, "sft", seq_len=64, batch_size=2, seed=0, verbose=True)
    line = capsys.readouterr().out
    st = it.stats()
    assert st["duplicates"] == removed and st["records"] == {"a": 30, "b": 10} and not st["skipped"]
    assert "duplicates removed 10 (a=5, b=5)" in line
    next(it)
    it.close()
    # Without data.dedup nothing is removed.
    plain = make_instruct_iterator(DataConfig(sources=srcs, tokenizer=TOKENIZER), "sft", seq_len=64, batch_size=2,
                                   seed=0)
    assert plain.stats()["records"] == {"a": 35, "b": 15} and plain.stats()["duplicates"] == {"a": 0, "b": 0}
    plain.close()


def test_dpo_pairs_are_keyed_on_prompt_chosen_and_rejected(tmp_path, capsys):
    pairs = [{"prompt": f"Return {i}.", "chosen": f"return {i}", "rejected": "No."} for i in range(6)]
    planted = [dict(pairs[2]), {"prompt": [{"role": "user", "content": " Return  4. "}], "chosen": "return 4\n",
                                "rejected": "No."}]
    near = [{"prompt": "Return 1.", "chosen": "return 1", "rejected": "No!"},  # another rejected answer
            {"prompt": "Return 1.", "chosen": "return 2", "rejected": "No."},
            {"prompt": [{"role": "system", "content": "Return 1."}], "chosen": "return 1", "rejected": "No."}]
    src = write(tmp_path / "p.jsonl", pairs + planted + near)
    out = tmp_path / "o.jsonl"
    assert dedup_main([src, "--out", str(out), "--task", "dpo"]) == 0
    assert read_out(out) == pairs + near and "removed 2 of 11 records" in capsys.readouterr().out
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=src)], tokenizer=TOKENIZER, dedup=True)
    it = make_instruct_iterator(cfg, "dpo", seq_len=64, batch_size=2, seed=0)
    assert it.stats()["duplicates"] == {"p.jsonl": 2} and it.stats()["records"] == {"p.jsonl": 9}
    it.close()


def test_progress_is_reported_as_records_are_read_and_a_file_given_twice_is_named_by_input(tmp_path):
    from sc_jax.instruct.duplicates import dedup_files

    src = write(tmp_path / "x.jsonl", [conv(f"Q{i}", "A") for i in range(25)])
    seen = []
    with HashIndex(str(tmp_path), batch=8) as index, open(tmp_path / "o.jsonl", "wb") as out:
        reports = dedup_files([("one", [src]), ("two", [src])], out, index=index, show=1,
                              progress=lambda rep: seen.append((rep.label, rep.records)), every=10)
        first = index.first(record_hash("sft", parse_for_key("sft", conv("Q0", "A"))), (9, 9, 9))
    assert first == (0, 0, 1)  # source 0, input 0 (not the last input that is the same file), line 1
    assert seen == [("one", 10), ("one", 20), ("two", 5), ("two", 15), ("two", 25)]  # every 10 of 50 read
    assert [(r.kept, r.duplicates, r.across) for r in reports] == [(25, 0, 0), (0, 25, 25)]
    assert reports[1].examples == [f"{src}:1 duplicates {src}:1"]


def test_lines_that_are_not_records_are_kept_as_they_are(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text('{"messages": []}\nnot json\n\nnot json\n' + json.dumps(conv("a", "b")) + "\n")
    out = tmp_path / "o.jsonl"
    assert dedup_main([str(src), "--out", str(out)]) == 0
    assert out.read_text() == '{"messages": []}\nnot json\nnot json\n' + json.dumps(conv("a", "b")) + "\n"
    assert "3 line(s) not records, kept as they are" in capsys.readouterr().out


def test_the_hash_index_is_on_disk():
    """The index is an SQLite file outside this process's memory: it grows on disk past its
    page cache, and a hash seen long before is still found."""
    with HashIndex(cache_mb=1) as index:
        items = ((record_hash("sft", [{"role": "user", "content": str(i)}]), (0, 0, i), i) for i in range(60_000))
        assert all(first is None for _, first in index.first_of(items))
        assert index.count == 60_000 and index.disk_bytes() > 1.5 * 2**20  # past the cache
        assert index.first(record_hash("sft", [{"role": "user", "content": " 7 "}]), (1, 0, 0)) == (0, 0, 7)
        where = index._dir
    assert not os.path.exists(where)  # removed on close


def _peak_rss_mb(src: str, out: str) -> float:
    """Peak RSS (MB) of deduplicating `src` in a fresh process, counted from after the imports
    (the kernel's high-water mark is reset there: /proc/self/clear_refs)."""
    code = ("import sys; from sc_jax.instruct.dedup import main\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            f"rc = main([{src!r}, '--out', {out!r}, '--cache-mb', '1', '--batch', '1000', '--show', '0'])\n"
            "status = dict(x.split(':', 1) for x in open('/proc/self/status'))\n"
            "print(int(status['VmHWM'].split()[0]) / 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Peak RSS of the command (1 MB of index cache, batches of 1,000) deduplicating 10k and 130k
    records (half of them duplicates) differs by less than a third of what a Python set of the
    60k extra distinct hashes alone would take."""
    sizes = {}
    for n in (10_000, 130_000):
        src = tmp_path / f"{n}.jsonl"
        line = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a"}]}\n'
        with open(src, "w") as f:
            f.writelines(line % (i % (n // 2)) for i in range(n))
        sizes[n] = _peak_rss_mb(str(src), str(tmp_path / f"{n}.out.jsonl"))
        with open(tmp_path / f"{n}.out.jsonl") as f:
            assert sum(1 for _ in f) == n // 2
    hashes = {record_hash("sft", [{"role": "user", "content": str(i)}]) for i in range(60_000)}
    in_a_set = (sys.getsizeof(hashes) + sum(map(sys.getsizeof, hashes))) / 2**20  # about 4.8 MB
    assert sizes[130_000] - sizes[10_000] < in_a_set / 3, (sizes, in_a_set)


DEDUP = "sc_jax.instruct.dedup"


def _one_file(d):
    write(os.path.join(d, "in.jsonl"), [conv("a", "b")])


BAD = [
    BadInput("dedup: missing input", DEDUP, ["nope.jsonl", "--out", "o.jsonl"], ("nope.jsonl",), leaves=("o.jsonl",)),
    BadInput("dedup: out exists", DEDUP, ["in.jsonl", "--out", "in2.jsonl"], ("exists", "--force"),
             setup=lambda d: (_one_file(d), write(os.path.join(d, "in2.jsonl"), []))),
    BadInput("dedup: out is an input", DEDUP, ["in.jsonl", "--out", "in.jsonl", "--force"], ("also an input",),
             setup=_one_file),
    BadInput("dedup: out is a directory", DEDUP, ["in.jsonl", "--out", "."], ("directory",), setup=_one_file),
    BadInput("dedup: no --out", DEDUP, ["in.jsonl"], ("--out",), setup=_one_file),
    BadInput("dedup: tmp dir missing", DEDUP, ["in.jsonl", "--out", "o.jsonl", "--tmp-dir", "gone"],
             ("--tmp-dir", "existing"), setup=_one_file, leaves=("o.jsonl",)),
    BadInput("dedup: bad task", DEDUP, ["in.jsonl", "--out", "o.jsonl", "--task", "pretrain"], ("--task",),
             setup=_one_file),
]


@pytest.mark.parametrize("row", BAD, ids=str)
def test_bad_input(row, tmp_path):
    run_bad_input(row, str(tmp_path))


def test_dedup_is_for_instruction_data(planted):
    from sc_jax.config import ConfigError
    from sc_jax.data import make_train_iterator

    paths, _, _, _ = planted
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=paths["b"])], tokenizer=TOKENIZER, dedup=True)
    with pytest.raises(ConfigError, match="data.dedup removes duplicate SFT/DPO records"):
        make_train_iterator(cfg, seq_len=16, batch_size=2, seed=0)
