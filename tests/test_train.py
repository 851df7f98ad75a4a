"""Sharded training: every mesh layout gives the losses of one device; the step, the
optimizer and the run directory behave as documented."""

import json
import os
import io
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from sc_jax import sharding
from sc_jax.config import ConfigError, to_dict
from sc_jax.optimizer import OptimizerConfig, decay_mask, lr_schedule
from sc_jax import train as T
from sc_jax.train import TrainingError, load_config, run
from sc_jax.train.__main__ import main

BASE = ["model.preset=tiny", "train.data=synthetic", "train.steps=4", "train.seq_len=32", "train.global_batch_size=8",
        "optimizer.peak_lr=3e-3", "optimizer.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.enabled=false"]


def losses(tmp_path, name, *overrides):
    cfg = load_config(None, BASE + [f"train.run_dir={tmp_path / name}", *overrides])
    run(cfg)
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return losses(tmp_path_factory.mktemp("one"), "one", "mesh.num_devices=1")


@pytest.mark.parametrize("layout", [
    ["mesh.data=8", "mesh.fsdp=1"],
    ["mesh.fsdp=8"],
    ["mesh.fsdp=4", "mesh.tensor=2"],
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ["mesh.fsdp=2", "mesh.tensor=4", "train.micro_batches=2"],
])
def test_mesh_layouts_give_single_device_losses(tmp_path, single_device, layout):
    got = losses(tmp_path, "mesh", *layout)
    assert len(got) == 4 and got[-1] < got[0]
    np.testing.assert_allclose(got, single_device, rtol=2e-5)


def test_gradient_accumulation_is_the_same_update(tmp_path, single_device):
    got = losses(tmp_path, "accum", "mesh.num_devices=1", "train.micro_batches=4")
    np.testing.assert_allclose(got, single_device, rtol=2e-5)


def test_param_shardings_follow_logical_rules():
    mesh = sharding.build_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), rules, mesh, (2, 64, 4, 16)) == \
        P(None, "fsdp", "tensor", None)
    # 2 kv heads cannot be split 4 ways: replicated rather than failing.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, mesh, (64, 2, 16)) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("act_batch", "act_seq"), rules, mesh) == P("fsdp", None)
    with pytest.raises(ConfigError, match="do not divide"):
        sharding.build_mesh(sharding.MeshConfig(fsdp=-1, tensor=3))
    with pytest.raises(ConfigError, match="only one mesh axis"):
        sharding.build_mesh(sharding.MeshConfig(data=-1, fsdp=-1))


def test_run_directory_metrics_and_final_checkpoint(tmp_path):
    cfg = load_config(None, BASE + [f"train.run_dir={tmp_path / 'run'}", "checkpoint.enabled=true",
                                    "checkpoint.every=100", "logging.tensorboard=true", "logging.device_kind=h100"])
    summary = run(cfg)
    run_dir = tmp_path / "run"
    records = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm"} <= set(r)
    for r in records[1:]:  # the first step includes compilation: no speed for it
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and r["tflops_per_device"] > 0
    assert load_config(str(run_dir / "config.yaml")) == cfg
    assert [r["tokens_seen"] for r in records] == [256, 512, 768, 1024]  # cumulative: step x tokens per step
    assert all(abs(r["time"] - time.time()) < 600 and 0 < r["elapsed"] < 600 for r in records)
    assert [r["elapsed"] for r in records] == sorted(r["elapsed"] for r in records)
    tags = tensorboard_tags(run_dir / "tb")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen"} <= tags
    assert all(t.startswith("train/") for t in tags) and "train/time" not in tags
    assert os.listdir(run_dir / "checkpoints") == ["4"]  # not on the interval, but the final step is kept
    assert summary["step"] == 4


def tensorboard_tags(tb_dir) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for name in os.listdir(tb_dir):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + length + 4
    return tags


def test_nonfinite_loss_stops_naming_the_step_or_skips(tmp_path):
    bad = ["optimizer.peak_lr=1e30", "optimizer.clip_norm=null", "mesh.num_devices=1"]
    with pytest.raises(TrainingError, match=r"at step \d"):
        run(load_config(None, BASE + [f"train.run_dir={tmp_path / 'a'}", *bad]))
    summary = run(load_config(None, BASE + [f"train.run_dir={tmp_path / 'b'}", "train.on_nonfinite=skip", *bad]))
    assert summary["skipped"] >= 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(summary["state"]["params"]))


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimizerConfig(peak_lr=3.2e-4, min_lr=3.2e-5, warmup_steps=10)
    sched = lr_schedule(cfg, 110)
    assert float(sched(0)) == pytest.approx(3.2e-5)  # the first step trains at peak/warmup, not 0
    assert float(sched(9)) == pytest.approx(3.2e-4)
    assert float(sched(60)) == pytest.approx((3.2e-4 + 3.2e-5) / 2, rel=1e-3)
    assert float(sched(110)) == pytest.approx(3.2e-5)
    assert OptimizerConfig().b2 == 0.95 and OptimizerConfig().eps == 1e-6 and OptimizerConfig().weight_decay == 0.1


def test_weight_decay_skips_biases_and_norms():
    params = {"model": {"norm": {"weight": 0, "bias": 0}, "layers": {"self_attn": {"q_proj": 0, "q_bias": 0},
                                                                       "input_layernorm": {"weight": 0}}},
              "lm_head": 0}
    mask = decay_mask(params)
    assert mask["lm_head"] and mask["model"]["layers"]["self_attn"]["q_proj"]
    assert not mask["model"]["norm"]["weight"] and not mask["model"]["layers"]["self_attn"]["q_bias"]
    assert not mask["model"]["layers"]["input_layernorm"]["weight"]


def test_config_errors_are_one_line(capsys):
    with pytest.raises(ConfigError, match="did you mean 'peak_lr'"):
        load_config(None, ["optimizer.peak_rl=1"])
    assert main(["model.preset=tiny", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "did you mean 'steps'" in err and "\n" not in err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback_match_one(tmp_path, single_device):
    """2 processes x 4 CPU devices (gloo collectives) = 1 process x 8 devices = 1 device."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-m", "sc_jax.train", *BASE, f"train.run_dir={tmp_path / 'mh'}",
                               "checkpoint.enabled=true", "checkpoint.every=2", "mesh.fsdp=4", "mesh.data=2",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [json.loads(x)["loss"] for x in open(tmp_path / "mh" / "metrics.jsonl")]
    np.testing.assert_allclose(got, single_device, rtol=2e-5)
    assert "2 process(es)" in outs[0]
    assert sorted(os.listdir(tmp_path / "mh" / "checkpoints")) == ["2", "4"]


def test_override_of_an_absent_section_starts_from_its_default():
    cfg = load_config(None, ["model.vocab_size=512"])
    assert cfg.model.hidden_size == 2560 and cfg.model.vocab_size == 512  # the default preset, not class defaults
    assert cfg.model.rope_theta == 1e6


def test_preset_override_replaces_the_section_whatever_the_order():
    cfg = load_config(None, ["model.remat=full", "model.preset=stable-code-3b", "model.dtype=bfloat16"])
    assert cfg.model.num_params() == 2_795_443_200 and cfg.model.rope_theta == 1e6
    assert (cfg.model.remat, cfg.model.dtype) == ("full", "bfloat16")


def test_held_out_loss_and_perplexity_are_logged(tmp_path, capsys):
    import math

    assert main(BASE + [f"train.run_dir={tmp_path / 'ev'}", "train.eval_every=2", "train.eval_batches=2",
                        "mesh.num_devices=1", "logging.tensorboard=true", "logging.print_every=3"]) == 0
    evals = [json.loads(x) for x in open(tmp_path / "ev" / "metrics.jsonl") if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval_loss"] < 10 and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
               for r in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # same held-out batches, two more steps of training
    assert {"eval/loss", "eval/perplexity"} <= tensorboard_tags(tmp_path / "ev" / "tb")
    # Not a terminal: plain lines (the first and last steps, every print_every-th), eval lines, then done.
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "parameters | mesh" in line)
    shown = [line.split(" |")[0] for line in lines[header + 1:] if line.startswith("step ")]
    assert shown == ["step 1/4", "step 2/4", "step 3/4", "step 4/4", "step 4/4"]
    step3 = next(line for line in lines if line.startswith("step 3/4"))
    assert " | loss " in step3 and " tokens/s | elapsed " in step3 and " | eta " in step3
    assert next(line for line in lines if line.startswith("step 2/4")).startswith("step 2/4 | eval loss ")
    done = next(i for i, line in enumerate(lines) if line.startswith("done:"))
    assert f"eval loss {evals[1]['eval_loss']:.4f}" in lines[done] and "loss nan" not in lines[done]
    assert str(tmp_path / "ev") in lines[done + 1] and "no checkpoints" in lines[done + 1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_keeps_the_training_fields_through_evals(monkeypatch):
    cfg = load_config(None, ["model.preset=tiny", "train.seq_len=32"])
    fake = _Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    progress = T.Progress(cfg, total=4, t0=time.time(), is_main=True)
    progress.print("header line")
    assert fake.getvalue() == ""  # no bar before the first step finished: the header stands on its own line
    for step in (1, 2):
        progress.step({"step": step, "loss": 5.25, "lr": 1e-3, "tokens_per_sec": 1234.0})
    progress.eval({"step": 2, "eval_loss": 4.5, "eval_perplexity": 90.0})
    progress.close()
    text = fake.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "loss=5.2500" in last and "lr=1.00e-03" in last and "tok_s=1,234" in last and "eval=4.5000" in last
    assert "nan" not in text and text.count("train:") >= 1


def test_eta_counts_from_the_first_finished_step_not_the_compile(monkeypatch, capsys):
    cfg = load_config(None, ["model.preset=tiny", "train.seq_len=32", "logging.progress=false",
                             "logging.print_every=1"])
    clock = iter([100.0, 101.0, 102.0])  # step 1 done after a 100 s compile, then 1 s per step
    monkeypatch.setattr(time, "time", lambda: next(clock))
    progress = T.Progress(cfg, total=11, t0=0.0, is_main=True)
    for step in (1, 2, 3):
        progress.step({"step": step, "loss": 1.0, "lr": 1e-3})
    lines = capsys.readouterr().out.splitlines()
    assert "eta" not in lines[0] and lines[0].endswith("elapsed 1m40s")
    assert lines[2].endswith("elapsed 1m42s | eta 8s")  # 8 steps left at 1 s each, not 102 s / 3 per step


def test_help_lists_every_section_with_defaults_and_print_config_writes_nothing(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for section in ("model", "mesh", "optimizer", "data", "train", "checkpoint", "logging"):
        assert f"\n  {section} " in text, section
    for default in ("steps=100", "peak_lr=0.00032", "preset=stable-code-3b", "every=1000", "print_seconds=30.0"):
        assert default in text, default
    for option in ("--config", "--print-config", "--restart", "--coordinator", "--num-processes", "--process-id"):
        assert option in text, option
    monkeypatch.chdir(tmp_path)
    assert main(["--print-config", "model.preset=tiny", "train.steps=7", "train.seq_len=64"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(None, ["model.preset=tiny", "train.steps=7", "train.seq_len=64"]))
    assert os.listdir(tmp_path) == []
