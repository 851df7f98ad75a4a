"""Sharded training: every mesh layout gives the losses of one device; the step, the
optimizer and the run directory behave as documented."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sc_jax import sharding
from sc_jax.config import ConfigError
from sc_jax.optimizer import OptimizerConfig, decay_mask, lr_schedule
from sc_jax.train import TrainingError, load_config, main, run

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
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))
    assert os.listdir(run_dir / "checkpoints") == ["4"]  # not on the interval, but the final step is kept
    assert summary["step"] == 4


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


def test_held_out_loss_and_perplexity_are_logged(tmp_path):
    import math

    run(load_config(None, BASE + [f"train.run_dir={tmp_path / 'ev'}", "train.eval_every=2", "train.eval_batches=2",
                                  "mesh.num_devices=1"]))
    evals = [json.loads(x) for x in open(tmp_path / "ev" / "metrics.jsonl") if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval_loss"] < 10 and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
               for r in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # same held-out batches, two more steps of training
