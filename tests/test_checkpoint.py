"""Checkpoints: a killed, preempted, resharded or damaged run resumes to exactly the run
it would have been (same data order, same losses, bitwise-equal parameters on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from corpus import data_overrides, make_corpus, make_tokenizer
from damage import damage_params
from sc_jax import checkpoint
from sc_jax.train import load_config, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-data")
    corpus = make_corpus(root / "corpus", repos=("json", "email"))
    return data_overrides(corpus, make_tokenizer(corpus, str(root / "tokenizer.json")))


def args(data, run_dir, *extra):
    return [*data, f"train.run_dir={run_dir}", "train.steps=12", "train.seq_len=64", "train.global_batch_size=8",
            "optimizer.peak_lr=3e-3", "optimizer.warmup_steps=2", "logging.progress=false",
            "checkpoint.every=4", "checkpoint.keep=null", *extra]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "loss" in r}


def final_params(run_dir):
    return checkpoint.to_numpy(checkpoint.load_params(str(run_dir))[1])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(load_config(None, args(data, run_dir)))
    return run_dir


def start(data, run_dir, pause_at):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), SC_JAX_PAUSE_AT_STEP=str(pause_at))
    return subprocess.Popen([sys.executable, "-m", "sc_jax.train", *args(data, run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, cond, what, timeout=240):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"run exited early waiting for {what}: {proc.stdout.read()}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def assert_same_run(run_dir, straight):
    assert losses(run_dir) == losses(straight)  # exact equality, every step
    jax.tree.map(np.testing.assert_array_equal, final_params(run_dir), final_params(straight))


def test_kill_9_between_saves_then_restart_is_identical(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(data, run_dir, pause_at=6)
    wait_for(proc, lambda: checkpoint.valid_steps(str(run_dir / "checkpoints")) == [4] and
             os.path.exists(run_dir / "metrics.jsonl") and 5 in losses(run_dir), "step 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.valid_steps(str(run_dir / "checkpoints")) == [4]
    summary = run(load_config(None, args(data, run_dir)))
    assert summary["step"] == 12
    assert_same_run(run_dir, straight)


def test_sigterm_saves_the_current_step_and_resumes(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(data, run_dir, pause_at=6)
    wait_for(proc, lambda: 5 in losses(run_dir) if os.path.exists(run_dir / "metrics.jsonl") else False, "step 6")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM at step 6" in out
    assert 6 in checkpoint.valid_steps(str(run_dir / "checkpoints"))
    run(load_config(None, args(data, run_dir)))
    assert_same_run(run_dir, straight)


def test_saved_on_8_devices_resumes_on_4_and_on_1(data, straight, tmp_path):
    run_dir = tmp_path / "run"
    run(load_config(None, args(data, run_dir, "train.stop_after_steps=4")))  # 8 devices (fsdp=-1)
    run(load_config(None, args(data, run_dir, "train.stop_after_steps=4", "mesh.num_devices=4", "mesh.fsdp=2",
                               "mesh.tensor=2")))
    run(load_config(None, args(data, run_dir, "mesh.num_devices=1")))
    got, want = losses(run_dir), losses(straight)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-4)


def test_truncated_newest_checkpoint_falls_back_to_previous(data, straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(load_config(None, args(data, run_dir, "train.stop_after_steps=8")))
    step8 = run_dir / "checkpoints" / "8"
    damage_params(step8)
    run(load_config(None, args(data, run_dir)))
    out = capsys.readouterr().out
    assert "checkpoint step 8" in out and "falling back" in out and "resumed from step 4" in out
    assert_same_run(run_dir, straight)
    # The damaged step was moved aside, so step 8 was saved again on the way to 12.
    assert [d.split("-")[0] for d in os.listdir(run_dir / "checkpoints" / "damaged")] == ["8"]
    assert checkpoint.valid_steps(str(run_dir / "checkpoints")) == [4, 8, 12]


def test_export_from_run_directory_loads_in_transformers(straight, tmp_path):
    from sc_jax import model as M
    from sc_jax.convert.__main__ import main as convert_main
    from flax import nnx
    import jax.numpy as jnp

    out = tmp_path / "hf"
    assert convert_main(["orbax-to-hf", "--ckpt", str(straight), "--out", str(out), "--dtype", "float32"]) == 0
    assert os.path.exists(out / "tokenizer.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    cfg, params, step = checkpoint.load_params(str(straight))
    assert step == 12
    ids = np.arange(40).reshape(2, 20) % cfg.vocab_size
    ours = np.asarray(nnx.merge(nnx.split(M.abstract_model(cfg))[0], params)(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<fim_prefix>") is not None
    # A chosen step, too.
    assert convert_main(["orbax-to-hf", "--ckpt", str(straight), "--step", "8", "--out", str(tmp_path / "hf8")]) == 0


def test_init_from_hf_directory_and_orbax(straight, tmp_path, data):
    from sc_jax.convert.__main__ import main as convert_main

    hf_dir = tmp_path / "hf"
    assert convert_main(["orbax-to-hf", "--ckpt", str(straight), "--out", str(hf_dir), "--dtype", "float32"]) == 0
    want = final_params(straight)
    for src in (str(hf_dir), str(straight)):
        run_dir = tmp_path / f"init-{len(os.listdir(tmp_path))}"
        summary = run(load_config(None, args(data, run_dir, f"train.init_from={src}", "train.steps=1",
                                             "optimizer.peak_lr=0", "optimizer.min_lr=0", "optimizer.warmup_steps=0")))
        got = checkpoint.to_numpy(summary["state"]["params"])
        jax.tree.map(np.testing.assert_array_equal, got, want)
        assert int(summary["state"]["step"]) == 1  # a fresh optimizer and step count
