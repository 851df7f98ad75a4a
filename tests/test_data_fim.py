"""Fill-in-the-middle and repository documents, on real code (stdlib packages)."""

import collections
import os

import numpy as np
import pytest
from data_fixtures import PACKAGES, STDLIB, document_tokens, stdlib_cfg, tok, tokenizer_path  # noqa: F401

from sc_jax.data import fim
from sc_jax.data.pretrain import build_document_dataset


def _stdlib_files(packages=PACKAGES):
    for pkg in packages:
        root = os.path.join(STDLIB, pkg)
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_cut_points_are_sorted_and_cover_the_edges():
    rng = np.random.default_rng(0)
    seen = collections.Counter()
    for _ in range(2000):
        a, b = fim.cut_points(5, rng)
        assert 0 <= a <= b <= 5
        seen[(a, b)] += 1
    assert len(seen) == 21  # every (a <= b) pair, empty pieces included
    assert fim.cut_points(0, rng) == (0, 0)


def test_fim_is_exactly_invertible_on_real_files(tok):
    sp = fim.SpecialIds.from_tokenizer(tok)
    encode = lambda texts: tok.encode_batch(texts, allow_special=False)  # noqa: E731
    layouts = collections.Counter()
    n_files = 0
    for path in _stdlib_files():
        raw = open(path, "rb").read()
        text = raw.decode("utf-8")
        for seed in range(3):
            rng = np.random.default_rng([seed, n_files])
            ids, spm = fim.fim_ids(text, encode, rng, 0.5, sp)
            layouts["spm" if spm else "psm"] += 1
            # PSM with an empty prefix reads as SPM (and inverts to the same text)
            assert fim.fim_layout(ids, sp) == ("spm" if spm or ids[1] == sp.fim_suffix else "psm")
            assert ids.count(sp.fim_prefix) == ids.count(sp.fim_suffix) == ids.count(sp.fim_middle) == 1
            back = fim.unpermute_ids(ids, sp)
            assert tok.decode(back).encode("utf-8") == raw  # the original bytes
            assert sorted(back) == sorted(i for i in ids if i not in (sp.fim_prefix, sp.fim_suffix, sp.fim_middle))
        n_files += 1
    assert n_files >= 30
    assert layouts["psm"] > 20 and layouts["spm"] > 20


def test_layouts_match_the_reference(tok):
    sp = fim.SpecialIds.from_tokenizer(tok)
    P, M, S = [1, 2], [3], [4, 5]
    assert fim.layout_ids(P, M, S, False, sp) == [sp.fim_prefix, 1, 2, sp.fim_suffix, 4, 5, sp.fim_middle, 3]
    assert fim.layout_ids(P, M, S, True, sp) == [sp.fim_prefix, sp.fim_suffix, 4, 5, sp.fim_middle, 1, 2, 3]
    for spm in (False, True):
        assert fim.unpermute_ids(fim.layout_ids(P, M, S, spm, sp), sp) == P + M + S
        assert fim.unpermute_ids(fim.layout_ids([], [], [], spm, sp), sp) == []


def _repo_files(pkg):
    root = os.path.join(STDLIB, pkg)
    return {os.path.relpath(p, root): open(p, "rb").read() for p in _stdlib_files([pkg])}


def test_repository_documents_round_trip_with_fim(tokenizer_path, tok):
    cfg = stdlib_cfg(tokenizer_path, packages=["json", "html", "dbm"], fim_rate=0.5, spm_rate=0.5, repo_orders=2)
    ds, info = build_document_dataset(cfg, seed=3, train=True)
    sp = fim.SpecialIds.from_tokenizer(tok)
    n_units = info.makers[0].num_units
    assert n_units == 3 * 2
    orders = collections.defaultdict(list)
    layouts = collections.Counter()
    for i in range(n_units):  # one epoch
        d = ds[i]
        ids = d["input_ids"].tolist() + [int(d["targets"][-1])]
        assert ids[0] == sp.repo_name and ids[-1] == sp.eos and ids.count(sp.eos) == 1
        doc = fim.parse_document(ids, tok, sp)
        expected = _repo_files(doc["repo_name"])
        got = {path: content.encode("utf-8") for path, content, _ in doc["files"]}
        assert got == expected  # every file back, byte for byte, FIM undone
        layouts.update(layout for _, _, layout in doc["files"])
        orders[doc["repo_name"]].append([p for p, _, _ in doc["files"]])
    assert sorted(orders) == ["dbm", "html", "json"]
    for name, os_ in orders.items():
        assert len(os_) == 2 and os_[0] != os_[1]  # two different file orders per repository
    assert layouts["psm"] and layouts["spm"] and layouts[None]
    # Same seed and index -> same document; another seed -> different choices.
    ds2, _ = build_document_dataset(cfg, seed=3, train=True)
    ds3, _ = build_document_dataset(cfg, seed=4, train=True)
    assert all(np.array_equal(ds[i]["input_ids"], ds2[i]["input_ids"]) for i in range(n_units))
    assert any(not np.array_equal(ds[i]["input_ids"], ds3[i]["input_ids"]) for i in range(n_units))


@pytest.mark.parametrize("fim_rate, spm_rate", [(0.0, 0.5), (1.0, 0.0), (1.0, 1.0)])
def test_rates_are_honoured(tokenizer_path, tok, fim_rate, spm_rate):
    cfg = stdlib_cfg(tokenizer_path, packages=["json", "dbm"], document="file", fim_rate=fim_rate, spm_rate=spm_rate)
    ds, _ = build_document_dataset(cfg, seed=0, train=False)
    sp = fim.SpecialIds.from_tokenizer(tok)
    layouts = collections.Counter()
    for ids in document_tokens(ds):
        assert sp.repo_name not in ids and ids[-1] == sp.eos
        layouts[fim.fim_layout(ids, sp)] += 1
    n = sum(layouts.values())
    if fim_rate == 0:
        assert layouts[None] == n
    else:
        assert layouts["spm" if spm_rate == 1 else "psm"] == n


def test_fim_fraction_near_rate(tokenizer_path):
    cfg = stdlib_cfg(tokenizer_path, document="file", fim_rate=0.5)
    ds, info = build_document_dataset(cfg, seed=0, train=True)
    sp = fim.SpecialIds.from_tokenizer(info.tokenizer)
    docs = [ds[i] for i in range(150)]
    firsts = [int(d["input_ids"][0]) for d in docs if d is not None]
    assert 0.4 < firsts.count(sp.fim_prefix) / len(firsts) < 0.6
