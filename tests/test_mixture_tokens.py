"""data.weight_unit: a mixture by tokens gives each source its weight's share of the training
tokens, whatever its document lengths; by documents (what runs saved before the key existed did)
its share of the documents drawn. Both are deterministic per element index and resume exactly,
and a state saved before the key existed resumes mixed by documents."""

import json
import os
import random

import numpy as np
import pytest

from sc_jax.data import DataConfig, SourceConfig, make_train_iterator
from sc_jax.data.iterator import SourceChangedError
from sc_jax.data.pipeline import TokenMix
from sc_jax.tokenizer import Tokenizer

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "iterator_states", "tokenizer.json")
SEQ, BATCH = 16, 2
WEIGHTS = (0.8, 0.2)  # long documents ("code") 0.8, short ones ("prose") 0.2, as in the paper's 80:20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL sources whose documents differ 20-fold in length and share no tokens but EOS:
    letters and underscores (about 200 tokens each) vs digits and commas (about 10)."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    long_docs = ["_".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
                          for _ in range(rng.randint(20, 60))) for _ in range(40)]
    short_docs = [",".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 6))) for _ in range(300)]
    paths, ids, _ = write_sources(root, long_docs, short_docs)
    return paths, ids


def write_sources(root, long_docs, short_docs):
    """(paths, token ids per source, each long document's token count) of the two JSONL sources."""
    paths = {}
    for name, docs in (("long", long_docs), ("short", short_docs)):
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"content": d, "path": f"{name}{i}.txt"}) + "\n" for i, d in enumerate(docs))
    tok = Tokenizer.from_file(TOKENIZER)
    encoded = {name: tok.encode_batch(docs, allow_special=False) for name, docs in (("long", long_docs),
                                                                                  ("short", short_docs))}
    ids = {name: {t for e in enc for t in e} for name, enc in encoded.items()}
    assert not ids["long"] & ids["short"]
    return paths, ids, [len(e) for e in encoded["long"]]


def config(paths, **kw) -> DataConfig:
    srcs = [SourceConfig(kind="jsonl", path=paths[name], weight=w, name=name, document="file", fim_rate=0.0,
                         languages=["*"]) for name, w in zip(("long", "short"), WEIGHTS)]
    return DataConfig(sources=srcs, tokenizer=TOKENIZER, fim_rate=0.0, **kw)


def delivered_shares(batches, ids) -> np.ndarray:
    """Token shares of the two sources in what the batches deliver, counted from the tokens
    themselves: each non-padding input token by the source whose vocabulary it is in."""
    counts = np.zeros(2)
    for b in batches:
        toks = b["input_ids"][b["segment_ids"] > 0]
        counts += [np.isin(toks, list(ids["long"])).sum(), np.isin(toks, list(ids["short"])).sum()]
    return counts / counts.sum()


def take(it, n):
    return [next(it) for _ in range(n)]


def test_token_shares_track_the_weights_over_1000_batches(corpus):
    paths, ids = corpus
    it = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=0)
    batches = take(it, 1000)
    got = delivered_shares(batches, ids)
    assert np.abs(got - WEIGHTS).max() < 0.01, got
    # What `python -m sc_jax.data.inspect` prints: the realised shares of the tokens built.
    mix = it.stats()["mixture"]
    assert [m["target"] for m in mix] == pytest.approx(WEIGHTS) and {m["unit"] for m in mix} == {"tokens"}
    assert np.abs(np.array([m["realised"] for m in mix]) - WEIGHTS).max() < 0.01, mix
    it.close()
    # By documents the same weights give the long source nearly all the tokens.
    docs = make_train_iterator(config(paths, weight_unit="documents"), seq_len=SEQ, batch_size=BATCH, seed=0)
    assert delivered_shares(take(docs, 200), ids)[0] > 0.95
    docs.close()


def test_a_token_mixture_resumes_mid_way_to_the_same_stream(corpus):
    paths, _ = corpus
    it = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=3)
    take(it, 37)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 20)
    it.close()
    assert state["fingerprint"]["weight_unit"] == "tokens"
    fresh = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=3)
    fresh.set_state(state)
    got = take(fresh, 20)
    for a, b in zip(got, want, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # The realised counts came back with the state (and went on from there).
    assert min(state["source_tokens"]) > 0
    assert all(m["tokens"] >= n for m, n in zip(fresh.stats()["mixture"], state["source_tokens"]))
    fresh.close()


@pytest.mark.slow
def test_a_token_mixture_resumes_with_worker_processes(corpus):
    paths, _ = corpus
    it = make_train_iterator(config(paths, num_workers=2), seq_len=SEQ, batch_size=BATCH, seed=0)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 4)
    it.close()
    fresh = make_train_iterator(config(paths, num_workers=2), seq_len=SEQ, batch_size=BATCH, seed=0)
    fresh.set_state(state)
    for a, b in zip(take(fresh, 4), want, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    fresh.close()


def test_hosts_read_disjoint_slices_of_one_token_mixture(corpus):
    """Host i of n reads elements i, i+n, ... of the one mixture: each host's stream is the same
    on every build (the estimate of tokens per unit is drawn from the seed, not from the host)."""
    paths, _ = corpus
    streams = []
    for _ in range(2):
        its = [make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=1, process_index=p,
                                   process_count=2) for p in range(2)]
        streams.append([[b["input_ids"] for b in take(i, 5)] for i in its])
        assert its[0].info.fingerprint["sources"] == its[1].info.fingerprint["sources"]
        for i in its:
            i.close()
    np.testing.assert_array_equal(np.array(streams[0]), np.array(streams[1]))
    assert not np.array_equal(streams[0][0], streams[0][1])


def test_a_state_saved_before_weight_unit_existed_resumes_mixed_by_documents(corpus):
    paths, _ = corpus
    old = make_train_iterator(config(paths, weight_unit="documents"), seq_len=SEQ, batch_size=BATCH, seed=0)
    take(old, 9)
    state = json.loads(json.dumps(old.get_state()))
    want = take(old, 6)
    old.close()
    # What today's code saved: no weight_unit in the fingerprint, no per-source tokens.
    del state["fingerprint"]["weight_unit"], state["source_tokens"]
    now = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=0)  # default: tokens
    assert now.info.fingerprint["weight_unit"] == "tokens"
    take(now, 2)  # already reading: restoring rebuilds the stream
    now.set_state(state)
    assert now.info.fingerprint["weight_unit"] == "documents"
    for a, b in zip(take(now, 6), want, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Its next state says documents: it keeps resuming so.
    assert now.get_state()["fingerprint"]["weight_unit"] == "documents"
    now.close()


def test_a_state_of_the_other_unit_is_refused(corpus):
    paths, _ = corpus
    it = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=0)
    take(it, 2)
    state = it.get_state()
    it.close()
    other = make_train_iterator(config(paths, weight_unit="documents"), seq_len=SEQ, batch_size=BATCH, seed=0)
    with pytest.raises(SourceChangedError, match="weight_unit tokens -> documents"):
        other.set_state(state)
    other.close()


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """As `corpus`, but the long source's sizes are heavy-tailed, as repositories are: 2,000
    documents of log-normal length (sigma 1.8: about 140 tokens on average, the largest ~8,000)."""
    root = tmp_path_factory.mktemp("heavy")
    rng, r = np.random.default_rng(0), random.Random(0)

    def doc(n_words):  # lines of up to 8 underscore-joined words
        words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(3, 8))) for _ in range(n_words)]
        return "\n".join("_".join(words[k:k + 8]) for k in range(0, n_words, 8))

    long_docs = [doc(max(1, int(round(x)))) for x in rng.lognormal(np.log(5), 1.8, 2000)]
    short_docs = [",".join(str(r.randint(0, 999)) for _ in range(r.randint(2, 6))) for _ in range(300)]
    return write_sources(root, long_docs, short_docs)


def test_heavy_tailed_sizes_are_measured_until_precise(heavy, caplog):
    """A fixed sample of 256 documents (what data.weight_sample alone gave) misjudges the long source's
    mean by ~17% here and the 80:20 mix by over 3 points; sampling on until the mean is known to 0.5%
    (here: every document, 2,000 < data.weight_sample_max) keeps it within 1 point over 1,000 batches."""
    paths, ids, lengths = heavy
    caplog.set_level("INFO", logger="sc_jax.data.pipeline")
    shares = {}
    for rule, extra in (("sampled to precision", {}), ("fixed 256", {"weight_sample_max": 256})):
        it = make_train_iterator(config(paths, **extra), seq_len=64, batch_size=8, seed=1)
        shares[rule] = delivered_shares(take(it, 1000), ids)
        estimate = it.info.fingerprint["sources"][0]["tokens_per_unit"]
        it.close()
        if not extra:
            assert estimate == pytest.approx(np.mean(lengths))  # every document: the exact mean
    assert np.abs(shares["sampled to precision"] - WEIGHTS).max() < 0.01, shares
    assert np.abs(shares["fixed 256"] - WEIGHTS).max() > 0.02, shares  # the rule this replaces
    line = next(x.getMessage() for x in caplog.records if x.getMessage().startswith("data: tokens per unit long"))
    assert "+- 0.00% (2000 units)" in line and "short " in line, line  # each mean with its uncertainty


def test_a_state_estimated_by_the_fixed_sample_resumes_its_own_stream(heavy):
    """States saved by the code before (one fixed sample of data.weight_sample units: what
    weight_sample_max=256 draws, the same units) carry their estimate; the stream is rebuilt with it."""
    paths, _, _ = heavy
    old = make_train_iterator(config(paths, weight_sample_max=256), seq_len=SEQ, batch_size=BATCH, seed=1)
    take(old, 30)
    state = json.loads(json.dumps(old.get_state()))
    want = take(old, 10)
    old.close()
    now = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=1)
    assert now.info.fingerprint["sources"] != state["fingerprint"]["sources"]
    take(now, 2)
    now.set_state(state)
    assert now.get_state()["fingerprint"] == state["fingerprint"]
    for a, b in zip(take(now, 10), want, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    now.close()
    # Other data still differs in its estimate and more: refused, not restreamed.
    state["fingerprint"]["sources"][1]["units"] += 1
    again = make_train_iterator(config(paths), seq_len=SEQ, batch_size=BATCH, seed=1)
    with pytest.raises(SourceChangedError, match="units 301 -> 300"):
        again.set_state(state)
    again.close()


def test_the_estimate_stops_once_precise_and_repeats_the_fixed_sample_first():
    """Constant sizes: the first 256 units already pin the mean, so nothing more is read; the first
    units are the fixed sample's (numpy's choice from (seed, source)), whatever the cap."""
    from sc_jax.data import stats
    from sc_jax.data.pipeline import Component, unit_tokens

    read = []

    def make(k, u):
        read.append(u)
        n = 10 + u % 2  # 10 or 11 tokens
        return {"input_ids": np.zeros(n, np.int32), "targets": np.zeros(n, np.int32)}

    rates, found = unit_tokens([Component(make, 100_000, 1.0)], seed=4, sample=256, sample_max=16384,
                               counters=stats.CounterSet(()), pipeline_id="")
    assert found[0].n == 256 and found[0].rse < 0.005 and rates == [found[0].mean]
    fixed = np.random.default_rng([4, 0, 0x70C5]).choice(100_000, size=256, replace=False)
    assert read == [int(u) for u in fixed]


def test_token_mix_draws_each_source_at_its_rate():
    """The interleave: over any window, source i has rates[i] / sum(rates) of the elements, give or
    take two (one per nested split); index k within each source counts up without gaps."""
    import grain

    parts = [grain.MapDataset.range(10**9).map(lambda x, s=s: (s, x)) for s in range(3)]
    mix = TokenMix(parts, [0.5, 0.01, 3.0])
    got = [mix[k] for k in range(20000)]
    share = np.array([0.5, 0.01, 3.0]) / 3.51
    for s in range(3):
        mine = [x for src, x in got if src == s]
        assert mine == list(range(len(mine)))
        assert abs(len(mine) - share[s] * 20000) <= 2
    far = mix[123456789]
    assert TokenMix(parts, [0.5, 0.01, 3.0])[123456789] == far == mix[123456789]  # random access, no state


def test_saved_run_configs_without_weight_unit_keep_documents():
    from sc_jax.train.config import config_changes, keep_saved_values, load_config

    cfg = load_config(None, ["data.sources=[{kind: jsonl, path: a.jsonl}, {kind: jsonl, path: b.jsonl}]"])
    assert cfg.data.weight_unit == "tokens"  # new runs
    saved = {"data": {"sources": [{"kind": "jsonl", "path": "a.jsonl"}, {"kind": "jsonl", "path": "b.jsonl"}]}}
    assert ("data.weight_unit", "documents", "tokens") in config_changes(saved, cfg)
    notes = keep_saved_values(saved, cfg)
    assert cfg.data.weight_unit == "documents" and "keeps its saved value 'documents'" in notes[0]
    assert config_changes(saved, cfg) == []
    # A run saved with tokens keeps tokens; one given documents explicitly on resume is refused as a change.
    cfg2 = load_config(None, ["data.weight_unit=documents"])
    assert keep_saved_values({"data": {"weight_unit": "tokens"}}, cfg2) == []
    assert config_changes({"data": {"weight_unit": "tokens"}}, cfg2) == [("data.weight_unit", "tokens", "documents")]


def test_inspect_prints_target_and_realised_shares(corpus, tmp_path, capsys):
    from sc_jax.data import inspect

    paths, _ = corpus
    cfg_file = tmp_path / "data.yaml"
    srcs = [{"kind": "jsonl", "path": paths[n], "weight": w, "name": n, "document": "file", "fim_rate": 0.0,
             "languages": ["*"]} for n, w in zip(("long", "short"), WEIGHTS)]
    cfg_file.write_text(json.dumps({"sources": srcs, "tokenizer": TOKENIZER, "fim_rate": 0.0}))
    assert inspect.main(["--config", str(cfg_file), "--seq-len", "16", "--batch-size", "2", "--batches", "300",
                         "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "mixture             target share of tokens -> realised share of tokens" in out
    lines = [x for x in out.splitlines() if x.strip().startswith(("0:long", "1:short"))]
    assert len(lines) == 2 and "80.00% ->" in lines[0] and "20.00% ->" in lines[1]
    realised = [float(x.split("->")[1].split("%")[0]) for x in lines]
    assert abs(realised[0] - 80) < 2 and abs(realised[1] - 20) < 2


def test_stage0_mixes_the_evolved_set_into_pretraining_by_tokens(corpus, tmp_path):
    """experiments/configs/stage0.yaml with its three sources pointed at small local data: the
    evolved SFT records are read as text documents and get their 5% of the tokens."""
    from sc_jax.train import load_config

    paths, _ = corpus
    evolved = tmp_path / "evolved.jsonl"
    with open(evolved, "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Sort {i} numbers."},
                                             {"role": "assistant", "content": f"sorted(xs[:{i}])"}],
                                "lineage": {"seed_id": f"s{i}", "round": 1, "operation": "deepen"}}) + "\n")
    cfg = load_config(os.path.join(os.path.dirname(TOKENIZER), "..", "..", "..", "experiments", "configs",
                                   "stage0.yaml"))
    data = cfg.data
    assert data.weight_unit == "tokens" and [s.weight for s in data.sources] == [0.76, 0.19, 0.05]
    assert data.sources[2].content_key == "messages"
    data.sources[0] = SourceConfig(kind="jsonl", path=paths["long"], weight=0.76, name="code", document="file",
                                   languages=["*"])
    data.sources[1].path, data.sources[2].path = paths["short"], str(evolved)
    data.tokenizer, data.num_workers, data.holdout_fraction = TOKENIZER, 0, 0.0
    it = make_train_iterator(data, seq_len=SEQ, batch_size=BATCH, seed=0)
    batches = take(it, 400)
    text = Tokenizer.from_file(TOKENIZER).decode(np.concatenate([b["input_ids"].ravel() for b in batches]).tolist())
    assert "Sort 3 numbers.\n\nsorted(xs[:3])" in text  # a record's turns, one document
    shares = [m["realised"] for m in it.stats()["mixture"]]
    assert np.abs(np.array(shares) - [0.76, 0.19, 0.05]).max() < 0.02, shares
    it.close()


def test_a_bad_weight_unit_is_one_error_line(corpus, tmp_path, capsys):
    from sc_jax.data import inspect

    paths, _ = corpus
    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text(json.dumps({"sources": [{"kind": "jsonl", "path": paths["long"]}], "tokenizer": TOKENIZER}))
    assert inspect.main(["--config", str(cfg_file), "data.weight_unit=bytes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.weight_unit 'bytes' must be one of tokens, documents")
