"""Iterator states saved by earlier code restore to exactly the batches that code produced next;
states saved over other data than a run reads are refused (or, asked for, warned about).

tests/fixtures/iterator_states/ holds, for pretraining (FIM, repository documents, concat and
first-fit packing, a weighted mixture, 2 worker processes, host 1 of 2, an eval iterator), SFT and
DPO: the JSON state a checkpoint stored after a few batches (meta["data_state"]) and the batches
that followed it, written by `generate.py` with the commit named in states.json. The corpus is
rebuilt here from tiny_corpus.py; the tokenizer is the one saved next to the states. The
pretraining states spell their counts "counters", the instruction ones "counts" (with "task"):
both must load. They have no "fingerprint" (older than it): they restore unchecked.

New states carry a fingerprint of what their grain indices point at (per source its unit count
and names, the weights, the host slice, num_workers, the seed, the split); `set_state` compares."""

import json
import logging
import os
import sys

import numpy as np
import pytest

from sc_jax.config import ConfigError
from sc_jax.data import pipeline
from sc_jax.data.iterator import SourceChangedError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "iterator_states"))
import tiny_corpus as tc  # noqa: E402

with open(tc.STATES) as _f:
    SAVED = json.load(_f)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tc.write_corpus(str(tmp_path_factory.mktemp("tiny_corpus")))


def saved_batches(name: str) -> list[dict]:
    z = np.load(tc.batches_file(name))
    out = [{} for _ in range(tc.BATCHES_AFTER)]
    for key in z.files:
        i, k = key.split("/")
        out[int(i)][k] = z[key]
    return out


def test_the_states_were_saved_by_a_named_commit():
    assert len(SAVED["saved_by"]) >= 7 and set(SAVED["states"]) == set(tc.CASES)
    # The workers case holds one grain state per worker process.
    assert len(SAVED["states"]["pretrain_concat_workers"]["grain"]["iterators_in_use_states"]) == 2


def _case(name):
    """Worker processes take seconds to start: those cases are slow tests."""
    return pytest.param(name, marks=pytest.mark.slow) if tc.CASES[name][1].get("num_workers") else name


@pytest.mark.parametrize("name", [_case(n) for n in sorted(tc.CASES)])
def test_saved_state_restores_to_the_same_batches(name, paths):
    state = SAVED["states"][name]
    want = saved_batches(name)
    it = tc.make_iterator(name, paths)
    first = next(it)  # the state is not where a fresh iterator starts: restoring has work to do
    assert any(not np.array_equal(first[k], want[0][k]) for k in want[0])
    it.set_state(state)
    for i, saved in enumerate(want):
        got = next(it)
        assert set(got) == set(saved), f"batch {i}"
        for k in saved:
            assert got[k].dtype == saved[k].dtype, f"batch {i} {k}"
            np.testing.assert_array_equal(got[k], saved[k], err_msg=f"{name} batch {i} {k}")
    # The counts came back too ("counters" in pretraining states, "counts" in instruction ones).
    pretrain = tc.CASES[name][0] == "pretrain"
    saved_built = state["counters"][1] if pretrain else state["counts"][0]  # "documents" / "examples"
    assert it.stats()["documents_built" if pretrain else "examples_built"] >= saved_built > 0
    assert it.stats()["batches"] == tc.SAVED_AFTER + tc.BATCHES_AFTER
    it.close()


# ----------------------------------------------------------------------------- fingerprint


@pytest.fixture
def corpus(tmp_path):
    """A corpus of its own, for tests that change it."""
    return tc.write_corpus(str(tmp_path / "corpus"))


def iterator(name, paths, fields=None, **args):
    """Case `name` with its DataConfig fields and iterator arguments updated."""
    task, base_fields, base_args = tc.CASES[name]
    cfg = tc.data_config({**base_fields, **(fields or {})}, paths)
    args = {**base_args, **args}
    train = not args.pop("eval", False)
    if task == "pretrain":
        from sc_jax.data import make_eval_iterator, make_train_iterator

        return (make_train_iterator if train else make_eval_iterator)(cfg, **args)
    from sc_jax.instruct import make_instruct_iterator

    return make_instruct_iterator(cfg, task, train=train, **args)


def saved_state(name, paths, fields=None, n=3, **args):
    """(the JSON state after n batches, the 3 batches after it)."""
    it = iterator(name, paths, fields, **args)
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(3)]
    it.close()
    return state, after


def assert_same(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {i} {k}")


def add_repository(paths, name="delta"):
    path = os.path.join(paths["repos"], name, "pkg", "mod0.py")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(f"def {name}(v):\n    return v + 1\n")


@pytest.mark.parametrize("name", ["pretrain_concat", "pretrain_first_fit_mix", "pretrain_eval", "sft", "dpo"])
def test_unchanged_sources_restore_exactly(name, corpus):
    state, want = saved_state(name, corpus)
    fp = state["fingerprint"]
    assert fp["split"] == ("eval" if name == "pretrain_eval" else "train") and fp["hosts"] == [0, 1]
    assert all(s["units"] > 0 and s["names"] for s in fp["sources"])
    fresh = iterator(name, corpus)
    fresh.set_state(state)
    assert_same([next(fresh) for _ in range(3)], want)
    fresh.close()


def test_a_repository_added_to_the_corpus_is_refused(corpus):
    state, _ = saved_state("pretrain_concat", corpus)
    add_repository(corpus)
    fresh = iterator("pretrain_concat", corpus)
    with pytest.raises(SourceChangedError) as e:
        fresh.set_state(state)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg  # one line from the trainer, exit 2
    assert f"source 0 (dir:{corpus['repos']}) units 6 -> 8 (repositories x repo_orders)" in msg
    assert "Resume with the original data" in msg and "data.on_source_change=warn" in msg and "--restart" in msg
    fresh.close()


def test_a_record_added_to_sft_data_is_refused(corpus):
    state, _ = saved_state("sft", corpus)
    with open(corpus["sft"], "a") as f:
        f.write(json.dumps(tc.conversations()[0]) + "\n")
    fresh = iterator("sft", corpus)
    with pytest.raises(SourceChangedError, match=r"source 0 \(jsonl:.*chat\.jsonl\) units 10 -> 11 \(records\)"):
        fresh.set_state(state)
    fresh.close()


def test_same_count_other_units_is_refused(corpus):
    """A repository replaced by another: the count is the same, the indices point elsewhere."""
    state, _ = saved_state("pretrain_concat", corpus)
    os.rename(os.path.join(corpus["repos"], "beta"), os.path.join(corpus["repos"], "bravo"))
    fresh = iterator("pretrain_concat", corpus)
    with pytest.raises(SourceChangedError, match=r"other units \(6 either way, names differ\)"):
        fresh.set_state(state)
    fresh.close()


def test_warn_continues_on_the_changed_data(corpus, caplog):
    state, _ = saved_state("pretrain_concat", corpus)
    add_repository(corpus)
    fresh = iterator("pretrain_concat", corpus, {"on_source_change": "warn"})
    with caplog.at_level(logging.WARNING, logger="sc_jax.data.iterator"):
        fresh.set_state(state)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "units 6 -> 8" in warned[0] and "data.on_source_change=warn" in warned[0]
    assert fresh.stats()["batches"] == 3  # resumed: the position and counts came back
    next(fresh)
    # From here on the states describe the new data: the next resume is exact, with the default check.
    again = json.loads(json.dumps(fresh.get_state()))
    assert again["fingerprint"]["sources"][0]["units"] == 8
    want = [next(fresh) for _ in range(2)]
    later = iterator("pretrain_concat", corpus)
    later.set_state(again)
    assert_same([next(later) for _ in range(2)], want)
    fresh.close()
    later.close()


def test_a_corpus_moved_elsewhere_is_the_same_data(corpus, tmp_path):
    state, want = saved_state("pretrain_first_fit_mix", corpus)
    moved = tc.write_corpus(str(tmp_path / "elsewhere"))
    fresh = iterator("pretrain_first_fit_mix", moved)
    fresh.set_state(state)
    assert_same([next(fresh) for _ in range(3)], want)
    fresh.close()


@pytest.mark.parametrize("saved, now, what", [
    ({}, {"eval": True}, "split 'train' -> 'eval'"),
    ({}, {"seed": 4}, "seed 3 -> 4"),
    ({}, {"process_index": 0, "process_count": 2}, "process_count 1 -> 2"),
    ({"fields": {"repo_orders": 3}}, {}, "units 9 -> 6"),
])
def test_other_streams_are_refused(corpus, saved, now, what):
    state, _ = saved_state("pretrain_concat", corpus, saved.get("fields"))
    fresh = iterator("pretrain_concat", corpus, **now)
    with pytest.raises(SourceChangedError, match=what.replace("(", r"\(").replace(")", r"\)")):
        fresh.set_state(state)
    fresh.close()


def test_weights_and_workers_are_compared():
    fp = {"layout": 1, "split": "train", "seed": 5, "shuffle": True, "hosts": [0, 1], "workers": 2,
          "sources": [{"kind": "dir", "path": "/a", "units": 6, "weight": 2.0, "names": "x"},
                      {"kind": "jsonl", "path": "/b", "units": 7, "weight": 1.0, "names": "y"}]}
    same_shares = {**fp, "sources": [{**fp["sources"][0], "weight": 4.0}, {**fp["sources"][1], "weight": 2.0}]}
    assert pipeline.changes(fp, same_shares) == []  # the mixture only sees the shares
    other = {**fp, "workers": 8, "sources": [fp["sources"][0], {**fp["sources"][1], "weight": 2.0}]}
    assert pipeline.changes(fp, other) == ["num_workers 2 -> 8", "weights [2.0, 1.0] -> [2.0, 2.0]"]
    assert pipeline.changes(fp, {**fp, "sources": fp["sources"][:1]}) == ["sources [dir:/a, jsonl:/b] -> [dir:/a]"]


def test_another_process_of_the_same_host_count_warns(corpus, caplog):
    """A checkpoint keeps one data state (process 0's): every process of a multi-host run restores it."""
    state, _ = saved_state("pretrain_concat", corpus, process_index=0, process_count=2)
    fresh = iterator("pretrain_concat", corpus, process_index=1, process_count=2)
    with caplog.at_level(logging.WARNING, logger="sc_jax.data.iterator"):
        fresh.set_state(state)
    assert any("saved by process 0 of 2 and is restored on process 1" in r.getMessage() for r in caplog.records)
    next(fresh)
    fresh.close()


def test_old_states_restore_unchecked_even_on_changed_data(corpus):
    """Without a fingerprint nothing can be compared: restored as before (the fixtures' states)."""
    state, _ = saved_state("pretrain_concat", corpus)
    del state["fingerprint"]
    add_repository(corpus)
    fresh = iterator("pretrain_concat", corpus)
    fresh.set_state(state)
    next(fresh)
    fresh.close()


def test_on_source_change_is_checked(corpus):
    with pytest.raises(ConfigError, match="data.on_source_change 'eror' must be one of error, warn"):
        iterator("pretrain_concat", corpus, {"on_source_change": "eror"})
