"""The packed pipeline on a real corpus (stdlib packages): conservation of tokens, batch layout,
exact resume (same process, fresh process, worker processes), per-host slices, epochs, inspect."""

import collections
import json
import textwrap

import numpy as np
import pytest
import yaml
from data_fixtures import (check_batch_invariants, document_tokens, rows_to_documents, run_cli,  # noqa: F401
                           segments, stdlib_cfg, tok, tokenizer_path)

from sc_jax.data import make_eval_iterator, make_train_iterator
from sc_jax.data.iterator import decode_state, encode_state
from sc_jax.data.pretrain import build_document_dataset

SEQ, BATCH = 256, 4


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("document", ["repository", "file"])
def test_concat_every_token_in_exactly_one_row(tokenizer_path, tok, document):
    cfg = stdlib_cfg(tokenizer_path, document=document)
    expected = document_tokens(build_document_dataset(cfg, seed=7, train=False)[0])
    it = make_eval_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=7)
    batches = list(it)
    for b in batches:
        check_batch_invariants(b, BATCH, SEQ)
    got = rows_to_documents(batches, tok.eos_id)
    assert got == expected  # same documents, same order, nothing lost or duplicated
    n_tokens = sum(len(d) - 1 for d in expected)  # each document: len-1 (input, target) pairs
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == n_tokens
    st = it.stats()
    assert st["tokens"] == n_tokens and st["documents_built"] == len(expected)
    # concat-then-split pads only the very last row
    assert sum(int((b["segment_ids"] == 0).sum()) for b in batches) < SEQ * BATCH
    assert st["fill_rate"] > 0.99 and 0.3 < st["fim_fraction"] < 0.7


def test_first_fit_keeps_every_chunk_whole(tokenizer_path, tok):
    cfg = stdlib_cfg(tokenizer_path, document="file", packing="first_fit", first_fit_bins=16)
    docs = document_tokens(build_document_dataset(cfg, seed=1, train=False)[0])
    expected = collections.Counter()
    for d in docs:
        for i in range(0, len(d) - 1, SEQ):
            expected[(d[i:i + SEQ][:len(d) - 1 - i], d[i + 1:i + 1 + SEQ])] += 1
    got = collections.Counter()
    it = make_eval_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=1)
    for b in it:
        check_batch_invariants(b, BATCH, SEQ)
        for r, s, t in segments(b):
            got[(tuple(b["input_ids"][r, s:t].tolist()), tuple(b["targets"][r, s:t].tolist()))] += 1
    assert got == expected  # documents are only cut at seq_len, and every piece lands once
    st = it.stats()
    assert st["documents_per_row"] > 1.0 and st["fill_rate"] < 1.0  # small files share rows; padding, no splits


@pytest.mark.parametrize("packing, k", [("concat", 0), ("concat", 3), ("concat", 11), ("first_fit", 3),
                                        ("first_fit", 9)])
def test_resume_in_process_is_exact(tokenizer_path, packing, k):
    cfg = stdlib_cfg(tokenizer_path, packing=packing, first_fit_bins=8, document="file" if k > 8 else "repository")
    kw = dict(seq_len=SEQ, batch_size=BATCH, seed=3)
    it = make_train_iterator(cfg, **kw)
    _take(it, k)
    state = json.dumps(it.get_state())  # JSON round trip, as a checkpoint would
    after = _take(it, 4)
    fresh = make_train_iterator(cfg, **kw)
    fresh.set_state(json.loads(state))
    _assert_same(_take(fresh, 4), after)
    assert fresh.stats()["batches"] == k + 4


def test_state_encoding_round_trips_tuples():
    state = {"a": (1, (2, 3)), "b": [(-1, -1)], "c": {1: "x"}, "d": b"\x00\x01", "e": np.int64(5)}
    back = decode_state(json.loads(json.dumps(encode_state(state))))
    assert back == {"a": (1, (2, 3)), "b": [(-1, -1)], "c": {1: "x"}, "d": b"\x00\x01", "e": 5}


_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sc_jax.config import from_dict
    from sc_jax.data import DataConfig, make_train_iterator

    def main(cfg_json, mode, state_path, out_path, k, m):
        cfg = from_dict(DataConfig, json.loads(cfg_json))
        it = make_train_iterator(cfg, seq_len=128, batch_size=2, seed=11)
        if mode == "restore":
            it.set_state(json.load(open(state_path)))
        else:
            for _ in range(int(k)):
                next(it)
            json.dump(it.get_state(), open(state_path, "w"))
        batches = [next(it) for _ in range(int(m))]
        np.savez(out_path, **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
        json.dump(it.stats(), open(out_path + ".json", "w"))
        it.close()

    if __name__ == "__main__":  # worker processes are spawned: they re-import this file
        main(*sys.argv[1:7])
""")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_a_fresh_process(tmp_path, tokenizer_path, num_workers):
    """State saved at step k in one process, restored in another: the same batches (also with workers)."""
    import dataclasses

    cfg = stdlib_cfg(tokenizer_path, packages=["json", "dbm", "tomllib", "html"], num_workers=num_workers)
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    state, a, b = tmp_path / "state.json", tmp_path / "a.npz", tmp_path / "b.npz"
    run_cli(str(script), cfg_json, "save", str(state), str(a), "5", "4")
    run_cli(str(script), cfg_json, "restore", str(state), str(b), "0", "4")
    za, zb = np.load(a), np.load(b)
    assert sorted(za.files) == sorted(zb.files) and len(za.files) == 4 * 5
    for key in za.files:
        np.testing.assert_array_equal(za[key], zb[key], err_msg=key)
    for out in (a, b):  # counts made in the worker processes reach the iterator
        st = json.load(open(str(out) + ".json"))
        assert st["files_built"] > 0 and st["batches"] == (5 + 4)
        assert st["fill_rate"] > 0.99


def test_host_slices_are_disjoint_and_cover(tokenizer_path, tok):
    cfg = stdlib_cfg(tokenizer_path)
    whole = collections.Counter(rows_to_documents(list(make_eval_iterator(cfg, seq_len=SEQ, batch_size=2, seed=0)),
                                                  tok.eos_id))
    parts = [collections.Counter(rows_to_documents(
        list(make_eval_iterator(cfg, seq_len=SEQ, batch_size=2, seed=0, process_index=i, process_count=2)),
        tok.eos_id)) for i in range(2)]
    assert parts[0] and parts[1] and not (parts[0] & parts[1])
    assert parts[0] + parts[1] == whole
    # Training streams: host i reads elements i, i+2, ... of the global document stream.
    ds, _ = build_document_dataset(cfg, seed=5, train=True)
    hosts = [build_document_dataset(cfg, seed=5, train=True, process_index=i, process_count=2)[0] for i in range(2)]
    for j in range(6):
        for i in range(2):
            np.testing.assert_array_equal(hosts[i][j]["input_ids"], ds[2 * j + i]["input_ids"])


def test_train_repeats_forever_with_new_orders_each_epoch(tokenizer_path):
    cfg = stdlib_cfg(tokenizer_path, packages=["dbm"], document="file", fim_rate=0.0)
    ds, info = build_document_dataset(cfg, seed=2, train=True)
    n = info.makers[0].num_units
    epoch = lambda e: [tuple(ds[e * n + i]["input_ids"][:8].tolist()) for i in range(n)]  # noqa: E731
    e0, e1 = epoch(0), epoch(1)
    assert sorted(e0) == sorted(e1) and e0 != e1  # same files, new order
    it = make_train_iterator(cfg, seq_len=128, batch_size=2, seed=2)
    corpus_tokens = sum(len(ds[i]["input_ids"]) for i in range(n))
    seen = 0
    while seen < 3 * corpus_tokens:
        b = next(it)
        check_batch_invariants(b, 2, 128)
        seen += int((b["segment_ids"] > 0).sum())


def test_eval_max_batches_pads_and_truncates(tokenizer_path):
    cfg = stdlib_cfg(tokenizer_path, packages=["dbm"])
    natural = len(list(make_eval_iterator(cfg, seq_len=SEQ, batch_size=2, seed=0)))
    padded = list(make_eval_iterator(cfg, seq_len=SEQ, batch_size=2, seed=0, max_batches=natural + 3))
    assert len(padded) == natural + 3
    for b in padded[natural:]:
        assert not b["loss_mask"].any() and not b["segment_ids"].any()
    assert len(list(make_eval_iterator(cfg, seq_len=SEQ, batch_size=2, seed=0, max_batches=1))) == 1


def test_inspect_cli(tmp_path, tokenizer_path, capsys):
    from sc_jax.data.inspect import main

    full = {"train": {"seq_len": 96}, "model": {"preset": "tiny"},
            "data": {"tokenizer": tokenizer_path,
                     "sources": [{"kind": "dir", "path": sysconfig_stdlib(), "layout": "repos", "include": ["json"]}]}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(full))
    assert main(["--config", str(path), "data.fim_rate=1.0", "--batches", "5", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "<repo_name>json<file_sep>" in out and "<fim_prefix>" in out
    for needle in ("tokens/s", "fill rate", "FIM fraction", "documents per row", "skipped"):
        assert needle in out
    assert "seq_len 96" in out
    # A data-only YAML with --seq-len; bad overrides / a missing tokenizer: one line, exit 2.
    data_only = tmp_path / "data.yaml"
    data_only.write_text(yaml.safe_dump(full["data"]))
    assert main(["--config", str(data_only), "--seq-len", "64", "--batches", "2", "--split", "eval"]) == 0
    assert "seq_len 64" in capsys.readouterr().out
    assert main(["--config", str(data_only), "fim_rat=0.1"]) == 2
    assert "did you mean 'fim_rate'" in capsys.readouterr().err
    proc = run_cli("-m", "sc_jax.data.inspect", "--config", str(data_only), "tokenizer=/no/such/tokenizer.json",
                   check_rc=2)
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def sysconfig_stdlib():
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def test_eval_warning_is_logged_once_per_run(tmp_path, tokenizer_path, caplog):
    """train.py's run_eval rebuilds the eval iterator (tasks.make_iterator, eval_=True) at every
    evaluation: the warning that it reads the training data must come once, not every time."""
    from sc_jax import tasks
    from sc_jax.train import load_config

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.py").write_text("def a():\n    return 1\n")
    cfg = load_config(None, ["model.preset=tiny", "train.data=pipeline", f"data.tokenizer={tokenizer_path}",
                             f"data.sources=[{{kind: dir, path: '{tmp_path}'}}]", "train.eval_batches=1",
                             "train.seq_len=32"])
    for _ in range(3):
        it = tasks.make_iterator(cfg, seq_len=32, batch_size=2, process_index=0, process_count=1, tokenizer=None,
                                 eval_=True)
        assert len(list(it)) == 1
    warned = [r for r in caplog.records if "no eval_sources" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


def test_old_iterator_state_with_fewer_counters_still_resumes(tokenizer_path):
    """States saved before a skip counter was added (a shorter `counters` list) resume exactly and
    keep their counts."""
    from sc_jax.data import stats

    cfg = stdlib_cfg(tokenizer_path, packages=["json"])
    it = make_train_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=0)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    state["counters"] = state["counters"][:stats.COUNTERS.index("bad_filename")]  # as written before it existed
    want = _take(it, 2)
    fresh = make_train_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=0)
    fresh.set_state(state)
    assert fresh.stats()["documents_built"] == state["counters"][stats.INDEX["documents"]] > 0
    _assert_same(want, _take(fresh, 2))
