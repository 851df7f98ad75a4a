"""Experiments: every shipped config loads, the fit planner compiles the real model on a
fake pod, the launchers are valid shell, and the quick start runs end to end."""

import glob
import json
import os
import subprocess
import sys

import pytest

from sc_jax.train import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml"))))
def test_every_experiment_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0


def test_paper_stages_match_the_recipe():
    s1 = load_config(os.path.join(ROOT, "experiments/configs/stage1.yaml"))
    s2 = load_config(os.path.join(ROOT, "experiments/configs/stage2.yaml"))
    assert s1.model.num_params() == 2_795_443_200 and s1.train.seq_len == 4096 and s1.model.rope_theta == 1e4
    assert s1.train.global_batch_size * s1.train.seq_len == 4 * 1024 * 1024  # ~4M tokens
    o = s1.optimizer
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.peak_lr, o.min_lr) == (0.9, 0.95, 1e-6, 0.1, 3.2e-4, 3.2e-5)
    assert (s1.data.fim_rate, s1.data.spm_rate) == (0.5, 0.5)
    weights = [src.weight for src in s1.data.sources]
    assert weights == [0.8, 0.2]
    assert s2.train.seq_len == 16384 and s2.model.rope_theta == 1e6 and s2.data.document == "repository"
    assert s2.train.global_batch_size * s2.train.seq_len == 4 * 1024 * 1024


def plan(*args):
    return subprocess.run([sys.executable, "-m", "sc_jax.plan", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=600)


def test_plan_fits_and_does_not_fit():
    tiny = ["model.preset=tiny", "train.seq_len=64", "train.global_batch_size=8"]
    ok = plan("--devices", "8", "--device-memory", "1", *tiny)
    assert ok.returncode == 0, ok.stderr
    assert "FITS" in ok.stdout and "fsdp': 8" in ok.stdout and "temporaries" in ok.stdout
    no = plan("--devices", "8", "--device-memory", "0.0001", *tiny, "model.remat=none")
    assert no.returncode == 1 and "DOES NOT FIT" in no.stdout and "model.remat=full" in no.stdout
    bad = plan("--devices", "8", "--device-memory", "1", "model.remat=sometimes")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_plan_real_stable_code_3b_at_16k_on_256_devices():
    r = plan("--config", os.path.join(ROOT, "experiments/configs/stage2.yaml"), "--devices", "256",
             "--device-memory", "40", "--device-kind", "a100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2,795,443,200 parameters, seq 16384" in r.stdout and "fsdp': 256" in r.stdout and "FITS" in r.stdout
    assert "tokens/s" in r.stdout


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launchers_are_valid_shell_running_train(script):
    path = os.path.join(ROOT, "experiments", "launch", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert "python -m sc_jax.train --config" in open(path).read()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "quickstart.py"), "--out", str(out),
                        "--steps", "40", "train.log_every=1", "logging.progress=false"],
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in open(out / "run" / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 40 and losses[-1] < losses[0] - 0.5
    assert "--- the model wrote:" in r.stdout
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(out / "hf" / f)
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
