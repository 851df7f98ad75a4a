"""Instruction tuning: SFT batches train on assistant tokens only, DPO starts at log 2 and moves
the margin without touching the reference, malformed records are counted (or name their line),
and pretrain -> SFT -> DPO -> Hugging Face export runs end to end and resumes exactly."""

import json
import math
import os
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sc_jax import checkpoint, instruct
from sc_jax import model as M
from sc_jax.config import ConfigError
from sc_jax.data.batches import BATCH_KEYS, PAIR_KEYS
from sc_jax.tokenizer import IM_END, IM_START, Tokenizer, iter_corpus_texts, train_tokenizer
from sc_jax.train import load_config, run
from sc_jax.train.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_YAML = os.path.join(REPO, "experiments", "configs", "sft.yaml")
DPO_YAML = os.path.join(REPO, "experiments", "configs", "dpo.yaml")
SEQ, BATCH = 192, 8


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = list(iter_corpus_texts(os.path.join(sysconfig.get_paths()["stdlib"], "json")))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(texts, 512).backend.save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.from_file(tok_path)


def conversations():
    convs = []
    for i in range(24):
        msgs = [{"role": "system", "content": "You are a careful Python assistant."}] if i % 3 == 0 else []
        msgs.append({"role": "user", "content": f"Write a function f{i} that returns {i} squared."})
        msgs.append({"role": "assistant", "content": f"def f{i}():\n    return {i} * {i}\n"})
        if i % 4 == 1:
            msgs.append({"role": "user", "content": "Add a docstring. What does <|im_end|> mean?"})
            msgs.append({"role": "assistant", "content": f'def f{i}():\n    """Square of {i}."""\n    return {i} ** 2'})
        if i % 5 == 2:
            msgs.append({"role": "user", "content": "Thanks!"})  # a trailing user turn
        convs.append({"messages": msgs})
    convs.append({"conversations": [{"from": "human", "value": "Print hello."},
                                    {"from": "gpt", "value": "print('hello')"}]})  # ShareGPT spelling
    long_answer = "\n".join(f"x{j} = {j} + {j}" for j in range(60))
    convs.append({"messages": [{"role": "user", "content": "Write many assignments."},
                               {"role": "assistant", "content": long_answer}]})  # longer than SEQ
    return convs


def pairs():
    out = [{"prompt": f"Write a function f{i} returning {i}.", "chosen": f"def f{i}():\n    return {i}",
            "rejected": "I will not write that."} for i in range(8)]
    out.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
                "chosen": "hi", "rejected": "Goodbye, and good luck with everything."})
    return out


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "chat.jsonl", conversations())


@pytest.fixture(scope="module")
def dpo_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", pairs())


def overrides(tok_path, data_file, task, run_dir="unused", *extra):
    # A DPO config names its reference model; these data-only tests never load it.
    reference = [f"train.init_from={run_dir}-reference"] if task == "dpo" else []
    return [f"train.task={task}", f"data.tokenizer={tok_path}", f"data.sources=[{{kind: jsonl, path: '{data_file}'}}]",
            "model.preset=tiny", "model.vocab_size=512", f"train.run_dir={run_dir}", f"train.seq_len={SEQ}",
            f"train.global_batch_size={BATCH}", "data.first_fit_bins=8", "logging.progress=false",
            "logging.tensorboard=false", *reference, *extra]


def iterator(tok_path, data_file, task, *extra, eval_=False):
    cfg = load_config(None, overrides(tok_path, data_file, task, "unused", *extra))
    return instruct.make_iterator(cfg, seq_len=SEQ, batch_size=BATCH, process_index=0, process_count=1,
                                  tokenizer=None, eval_=eval_)


def segments(batch):
    """(row, segment id, index array) for every packed conversation."""
    for r, seg in enumerate(batch["segment_ids"]):
        for k in range(1, int(seg.max()) + 1):
            yield r, k, np.flatnonzero(seg == k)


def messages_of(record):
    return instruct.parse_chat(record)


def init_params(model_cfg, seed=0):
    """(graphdef, params) created under jit (eager creation is many small dispatches)."""
    graphdef = nnx.split(M.abstract_model(model_cfg))[0]
    return graphdef, jax.jit(lambda: nnx.split(M.create_model(model_cfg, seed))[1].to_pure_dict())()


def apply_fn(graphdef):
    return jax.jit(lambda params, ids, positions=None, segment_ids=None:
                   nnx.merge(graphdef, params)(ids, positions=positions, segment_ids=segment_ids))


# ----------------------------------------------------------------------------- SFT


def test_sft_packed_batch_masks_exactly_the_assistant_tokens(tok_path, tok, sft_file):
    by_text = {instruct.render_text(messages_of(c)): messages_of(c) for c in conversations()}
    it = iterator(tok_path, sft_file, "sft")
    im_end = tok.token_id(IM_END)
    seen, multi = 0, 0
    for _ in range(3):
        b = next(it)
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape == (BATCH, SEQ) and b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
        pad = b["segment_ids"] == 0
        assert (b["loss_mask"][pad] == 0).all() and (b["positions"][pad] == 0).all()
        multi += int((b["segment_ids"].max(axis=1) > 1).sum())
        for r, k, idx in segments(b):
            assert (np.diff(idx) == 1).all()  # contiguous, positions restart per conversation
            np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
            ids = np.concatenate([b["input_ids"][r, idx], b["targets"][r, idx][-1:]])
            np.testing.assert_array_equal(b["input_ids"][r, idx][1:], b["targets"][r, idx][:-1])  # shifted by one
            text = tok.decode(ids)
            truncated = text not in by_text
            if truncated:  # the long conversation, cut at SEQ: a prefix of its rendering
                (full,) = [t for t in by_text if t.startswith(text)]
                assert len(idx) == SEQ
            msgs = by_text[full if truncated else text]
            mask = b["loss_mask"][r, idx]
            assert set(np.unique(mask)) <= {0.0, 1.0}
            learned = tok.decode(b["targets"][r, idx][mask == 1])
            want = "".join(m["content"] + IM_END for m in msgs if m["role"] == "assistant")
            if truncated:
                assert want.startswith(learned) and len(learned) > 100
            else:
                assert learned == want
                # token by token: every masked target is assistant text or the <|im_end|> closing an
                # assistant turn; "<|im_end|>" written inside a message is plain text, not the token
                assert int((ids == im_end).sum()) == len(msgs)
                assert int(((b["targets"][r, idx] == im_end) & (mask == 1)).sum()) == \
                    sum(m["role"] == "assistant" for m in msgs)
                n_assistant = sum(len(tok.encode(m["content"], allow_special=False)) + 1
                                  for m in msgs if m["role"] == "assistant")
                assert int(mask.sum()) == n_assistant
            unlearned = tok.decode(b["targets"][r, idx][mask == 0])
            for m in msgs:
                if m["role"] != "assistant" and m["content"] and not truncated:
                    assert m["content"] in unlearned  # system and user text: mask 0
            assert b["input_ids"][r, idx][0] == tok.token_id(IM_START)
            seen += 1
    assert seen >= 3 * BATCH and multi > 0  # several conversations share rows


def test_sft_segments_are_isolated_in_the_model(tok_path, sft_file):
    cfg = load_config(None, overrides(tok_path, sft_file, "sft"))
    graphdef, params = init_params(cfg.model)
    model = apply_fn(graphdef)
    b = next(iterator(tok_path, sft_file, "sft"))
    r = int(np.argmax(b["segment_ids"].max(axis=1)))
    assert b["segment_ids"][r].max() >= 2
    packed = np.asarray(model(params, b["input_ids"][r:r + 1], b["positions"][r:r + 1], b["segment_ids"][r:r + 1]))[0]
    for _, k, idx in segments({k: v[r:r + 1] for k, v in b.items()}):
        alone = np.asarray(model(params, b["input_ids"][r, idx][None]))[0]
        np.testing.assert_allclose(packed[idx], alone, atol=2e-5, rtol=2e-5)


def test_sft_eval_pass_yields_every_conversation_once(tok_path, tok, sft_file):
    it = iterator(tok_path, sft_file, "sft", eval_=True)
    texts = []
    for b in it:
        for r, _, idx in segments(b):
            texts.append(tok.decode(np.concatenate([b["input_ids"][r, idx], b["targets"][r, idx][-1:]])))
    want = [instruct.render_text(messages_of(c)) for c in conversations()]
    assert len(texts) == len(want)
    assert sorted(t for t in texts if t in want) == sorted(want[:-1])  # all but the long one, whole
    st = it.stats()
    assert st["truncated"] == 1 and st["examples_built"] == len(want) and st["skipped"] == {}


# ----------------------------------------------------------------------------- DPO


def test_dpo_rows_and_loss_is_log2_when_policy_is_reference(tok_path, tok, dpo_file):
    it = iterator(tok_path, dpo_file, "dpo", eval_=True)  # one pass in order; the last batch padded
    batches = list(it)
    assert len(batches) == 2
    for b in batches:
        assert set(b) == set(PAIR_KEYS)
    b = batches[0]
    for i, p in enumerate(pairs()[:BATCH]):
        prompts = []
        for side in ("chosen", "rejected"):
            m = b[f"{side}_loss_mask"][i] == 1
            assert tok.decode(b[f"{side}_targets"][i][m]) == p[side] + IM_END
            n = int(b[f"{side}_segment_ids"][i].sum())
            np.testing.assert_array_equal(b[f"{side}_positions"][i][:n], np.arange(n))
            prompts.append(tok.decode(b[f"{side}_input_ids"][i][:int(np.argmax(m)) + 1]))
        assert prompts[0] == prompts[1] == instruct.render_text([{"role": "user", "content": p["prompt"]}], True)

    cfg = load_config(None, overrides(tok_path, dpo_file, "dpo"))
    graphdef, params = init_params(cfg.model)
    loss_fn = instruct.dpo_loss_fn(0.1)
    f = jax.jit(lambda p, batch, ref: loss_fn(graphdef, p, batch, ref))
    for batch, n_pairs in ((batches[0], BATCH), (batches[1], len(pairs()) - BATCH)):  # the 2nd: 7 empty rows
        total, count, aux = f(params, batch, params)
        assert float(count) == n_pairs
        assert abs(float(total) / float(count) - math.log(2)) < 1e-6
        assert float(aux["reward_margin"]) == 0 and float(aux["chosen_reward"]) == 0
        assert float(aux["reward_accuracy"]) == 0
        assert float(aux["chosen_logp"]) < 0
    # the reference receives no gradient, the policy does
    grad = jax.jit(jax.grad(lambda p, ref: loss_fn(graphdef, p, batches[0], ref)[0], argnums=(0, 1)))
    g_policy, g_ref = grad(params, params)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ref)) == 0
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_policy)) > 0


def test_dpo_long_pairs_lose_the_prompt_start_or_are_skipped(tok):
    fmt = instruct.ChatFormat(tok)
    prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    ex, note = instruct.dpo_example(fmt, prompt, "short", "a bit longer answer", 24)
    assert note == "truncated"
    for side, answer in (("chosen", "short"), ("rejected", "a bit longer answer")):
        m = ex[f"{side}_loss_mask"] == 1
        assert tok.decode(ex[f"{side}_targets"][m]) == answer + IM_END
        n = int(ex[f"{side}_segment_ids"].sum())
        text = tok.decode(ex[f"{side}_input_ids"][:n]) + tok.decode(ex[f"{side}_targets"][n - 1:n])
        assert text.endswith(f"{IM_START}assistant\n{answer}{IM_END}") and not text.startswith(IM_START)
    assert (ex["rejected_segment_ids"] == 1).all()  # the longer side fills the row exactly
    np.testing.assert_array_equal(ex["chosen_input_ids"][:5], ex["rejected_input_ids"][:5])  # same prompt cut
    assert instruct.dpo_example(fmt, prompt, "x " * 40, "y", 24) == (None, "too_long")


# ----------------------------------------------------------------------------- malformed records


BAD_SFT = [
    "{not json",
    "[1, 2]",
    json.dumps({"text": "no messages"}),
    json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "a"}]}),
    json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}]}),
    json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
    json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
    "",
    json.dumps({"messages": []}),
    # Empty answers (as DPO): the only answer "", a whitespace-only one, one empty turn of two.
    json.dumps({"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]}),
    json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " \n\t"}]}),
    json.dumps({"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."},
                             {"role": "user", "content": "b?"}, {"role": "assistant", "content": ""}]}),
]
BAD_DPO = [
    json.dumps({"prompt": "p", "chosen": "c"}),
    json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"}),
    json.dumps({"prompt": "p", "chosen": "c", "rejected": ""}),
    json.dumps({"prompt": 5, "chosen": "c", "rejected": "r"}),
    json.dumps({"prompt": "", "chosen": "c", "rejected": "r"}),
    json.dumps({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}),
    "{\"prompt\": ",
]


def test_malformed_records_are_skipped_and_counted(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", conversations()[:3], BAD_SFT)
    it = iterator(tok_path, path, "sft")
    next(it)
    st = it.stats()
    assert st["records"] == {"sft.jsonl": 3}
    assert st["skipped"] == {"bad_json": 1, "not_object": 1, "missing_field": 2, "bad_message": 3, "no_assistant": 1,
                             "empty_answer": 3}
    with pytest.raises(instruct.RecordError, match=r"messages\[3\] \(assistant\) is empty"):
        instruct.parse_chat(json.loads(BAD_SFT[-1]))
    path = write_jsonl(tmp_path / "dpo.jsonl", pairs()[:2], BAD_DPO)
    it = iterator(tok_path, path, "dpo")
    next(it)
    assert it.stats()["skipped"] == {"missing_field": 2, "empty_answer": 2, "empty_prompt": 1, "bad_message": 1,
                                     "bad_json": 1}


def test_eval_warning_is_logged_once_per_run(tok_path, tmp_path, caplog):
    """The trainer rebuilds the eval iterator at every evaluation: its config warning, once."""
    path = write_jsonl(tmp_path / "sft.jsonl", conversations()[:4])
    for _ in range(3):
        iterator(tok_path, path, "sft", eval_=True)
    warned = [r for r in caplog.records if "no eval_sources" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"


def test_strict_mode_names_file_and_line(tok_path, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", conversations()[:3], BAD_SFT)
    cfg = load_config(None, overrides(tok_path, path, "sft", "unused", "data.strict=true"))
    with pytest.raises(ConfigError, match=rf"^{path}:4: bad JSON"):
        instruct.make_iterator(cfg, seq_len=SEQ, batch_size=BATCH, process_index=0, process_count=1, tokenizer=None)
    path = write_jsonl(tmp_path / "dpo.jsonl", pairs()[:2], BAD_DPO[1:])
    cfg = load_config(None, overrides(tok_path, path, "dpo", tmp_path / "run", "data.strict=true"))
    with pytest.raises(ConfigError, match=rf"^{path}:3: 'chosen' is empty"):
        run(cfg)


# ----------------------------------------------------------------------------- resume


def test_iterator_state_is_json_and_resumes_exactly(tok_path, sft_file, dpo_file):
    for task, path in (("sft", sft_file), ("dpo", dpo_file)):
        it = iterator(tok_path, path, task)
        for _ in range(3):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(4)]  # crosses epochs
        fresh = iterator(tok_path, path, task)
        fresh.set_state(state)
        for a, b in zip(want, [next(fresh) for _ in range(4)]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{task} {k}")


# ----------------------------------------------------------------------------- end to end


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


def sft_args(tok_path, sft_file, init, run_dir, *extra):
    return ["model.preset=tiny", "model.vocab_size=512", "model.dtype=float32", "model.remat=none",
            f"data.tokenizer={tok_path}", f"data.sources=[{{kind: jsonl, path: '{sft_file}'}}]",
            "data.holdout_fraction=0.25", "data.first_fit_bins=8", "data.read_threads=1",
            f"train.run_dir={run_dir}", f"train.init_from={init}", f"train.seq_len={SEQ}",
            f"train.global_batch_size={BATCH}", "train.steps=6", "train.eval_every=0", "train.eval_batches=1",
            "optimizer.peak_lr=3e-3", "optimizer.warmup_fraction=0.2", "checkpoint.every=100",
            "logging.progress=false", "logging.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok_path, sft_file, dpo_file):
    root = tmp_path_factory.mktemp("runs")
    pre = root / "pretrain"
    run(load_config(None, ["train.data=synthetic", "model.preset=tiny", "model.vocab_size=512", f"train.run_dir={pre}",
                           "train.steps=2", "train.seq_len=64", "train.global_batch_size=8",
                           "logging.progress=false", "logging.tensorboard=false"]))
    sft = root / "sft"
    assert main(["--config", SFT_YAML, *sft_args(tok_path, sft_file, pre, sft)]) == 0
    dpo = root / "dpo"
    cfg = load_config(DPO_YAML, [
        "model.preset=tiny", "model.vocab_size=512", "model.dtype=float32", "model.remat=none",
        f"data.tokenizer={sft}/tokenizer.json", f"data.sources=[{{kind: jsonl, path: '{dpo_file}'}}]",
        "data.holdout_fraction=0", f"train.run_dir={dpo}", f"train.init_from={sft}", "train.seq_len=64",
        f"train.global_batch_size={BATCH}", "train.steps=8", "train.eval_every=0", "train.eval_batches=1",
        "train.dpo_beta=0.5", "optimizer.peak_lr=1e-3", "checkpoint.every=100", "logging.progress=false",
        "logging.tensorboard=false"])
    assert cfg.optimizer.name == "rmsprop" and cfg.train.task == "dpo"
    summary = run(cfg)
    return {"pre": pre, "sft": sft, "dpo": dpo, "dpo_summary": summary}


def test_sft_learns_and_dpo_raises_the_margin_with_a_frozen_reference(runs):
    sft = losses(runs["sft"])
    assert sorted(sft) == list(range(1, 7)) and sft[6] < sft[1]
    records = [json.loads(x) for x in open(runs["sft"] / "metrics.jsonl")]
    assert any("eval_loss" in r for r in records)
    recs = {r["step"]: r for r in map(json.loads, open(runs["dpo"] / "metrics.jsonl")) if "loss" in r}
    assert abs(recs[1]["loss"] - math.log(2)) < 1e-6 and recs[1]["reward_margin"] == 0
    assert recs[8]["reward_margin"] > 0.5 and recs[8]["reward_accuracy"] == 1.0 and recs[8]["loss"] < recs[1]["loss"]
    assert recs[8]["chosen_reward"] > recs[8]["rejected_reward"]
    assert recs[8]["tokens"] == BATCH  # count = pairs
    summary = runs["dpo_summary"]
    ref = checkpoint.to_numpy(summary["state"]["ref_params"])
    sft_params = checkpoint.to_numpy(checkpoint.load_params(str(runs["sft"]))[1])
    jax.tree.map(np.testing.assert_array_equal, ref, sft_params)  # bitwise the SFT model
    policy = checkpoint.to_numpy(summary["state"]["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(ref)))
    assert "eval_loss" in summary


def test_dpo_run_exports_to_transformers(runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "sc_jax.convert", "orbax-to-hf", "--ckpt", str(runs["dpo"]), "--out",
                    str(out), "--dtype", "float32"], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=REPO))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf_tok.chat_template = instruct.CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write f3 returning 3."}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == instruct.render_text(msgs, add_generation_prompt=True)
    ours_tok = Tokenizer.from_file(str(runs["dpo"] / "tokenizer.json"))
    ids = instruct.ChatFormat(ours_tok).encode_prompt(msgs)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    cfg, params, step = checkpoint.load_params(str(runs["dpo"]))
    assert step == 8
    ours = np.asarray(apply_fn(nnx.split(M.abstract_model(cfg))[0])(params, jnp.asarray([ids])))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sft_interrupted_and_resumed_gives_the_same_losses(runs, tmp_path, tok_path, sft_file):
    run_dir = tmp_path / "resumed"
    args = sft_args(tok_path, sft_file, runs["pre"], run_dir)
    first = run(load_config(SFT_YAML, args + ["train.stop_after_steps=3"]))
    assert first["stopped_by"] == "train.stop_after_steps" and first["step"] == 3
    second = run(load_config(SFT_YAML, args))
    assert second["step"] == 6
    assert losses(run_dir) == losses(runs["sft"])  # exact, every step
    jax.tree.map(np.testing.assert_array_equal, checkpoint.to_numpy(second["state"]["params"]),
                 checkpoint.to_numpy(checkpoint.load_params(str(runs["sft"]))[1]))


def test_resume_on_changed_sft_data_is_refused_before_anything_is_written(runs, tmp_path, tok_path):
    """Records appended to the data between a stop and its resume: the saved positions would read
    other records, so the rerun stops with one line (data.on_source_change) and writes nothing."""
    from sc_jax.data.iterator import SourceChangedError

    data = write_jsonl(tmp_path / "chat.jsonl", conversations())
    run_dir = tmp_path / "changed"
    args = sft_args(tok_path, data, runs["pre"], run_dir)
    assert run(load_config(SFT_YAML, args + ["train.stop_after_steps=2"]))["step"] == 2
    more = [{"messages": [{"role": "user", "content": f"Print {i}."}, {"role": "assistant", "content": f"print({i})"}]}
            for i in range(6)]
    with open(data, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in more)
    listing = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))  # noqa: E731
    before = listing()
    with pytest.raises(SourceChangedError, match=r"source 0 \(jsonl:.*chat\.jsonl\) units \d+ -> \d+ \(records\).*"
                                                 r"data\.on_source_change=warn.*--restart"):
        run(load_config(SFT_YAML, args))
    assert listing() == before


def test_configs_carry_the_paper_defaults():
    sft, dpo = load_config(SFT_YAML), load_config(DPO_YAML)
    assert (sft.train.task, sft.train.seq_len, sft.train.global_batch_size) == ("sft", 4096, 512)
    assert sft.optimizer.schedule == "cosine" and sft.model.rope_theta == 1e6 and sft.train.init_from
    assert (dpo.train.task, dpo.optimizer.name, dpo.optimizer.peak_lr) == ("dpo", "rmsprop", 5e-7)
    assert dpo.train.init_from and dpo.optimizer.warmup_fraction > 0
    assert sft.data.sources[0].kind == dpo.data.sources[0].kind == "jsonl"
