"""Iterator states saved by earlier code restore to exactly the batches that code produced next.

tests/fixtures/iterator_states/ holds, for pretraining (FIM, repository documents, concat and
first-fit packing, a weighted mixture), SFT and DPO: the JSON state a checkpoint stored after a
few batches (meta["data_state"]) and the batches that followed it, written by `generate.py` with
the commit named in states.json. The corpus is rebuilt here from tiny_corpus.py; the tokenizer
is the one saved next to the states. The pretraining states spell their counts "counters", the
instruction ones "counts" (with "task"): both must load."""

import json
import os
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("name", sorted(tc.CASES))
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
