"""Experiments: every shipped config loads, the fit planner compiles the real model on a
fake pod, the launchers are valid shell, and the quick start runs end to end."""

import glob
import importlib.util
import json
import math
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
    ok = plan("--devices", "8", "--device-memory", "1", "--remat-policies", "full", *tiny)
    assert ok.returncode == 0, ok.stderr
    assert "FITS" in ok.stdout and "fsdp': 8" in ok.stdout and "temporaries" in ok.stdout
    assert "model.remat policies" in ok.stdout and "none *" in ok.stdout and "\n  full " in ok.stdout
    no = plan("--devices", "8", "--device-memory", "0.0001", "--remat-policies", "off", *tiny, "model.remat=none")
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


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sbatch"])
def test_launchers_are_the_sweep_templates_rendered(script):
    """experiments/launch/ and the sweep's job scripts come from one template each (no drift)."""
    from sc_jax.sweep.templates import launch_script

    path = os.path.join(ROOT, "experiments", "launch", script)
    assert open(path).read() == launch_script(script), (
        "experiments/launch/ differs from sc_jax/sweep/templates.py: edit the template, then run python -c "
        "'from sc_jax.sweep.templates import write_launch_scripts; write_launch_scripts()'")
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("launcher", ["slurm", "tpu"])
def test_sweep_jobs_and_launchers_share_every_template_line(launcher, tmp_path):
    from sc_jax.sweep import jobs, templates
    from sc_jax.sweep.grid import Point

    template, script = (templates.SLURM, "slurm_gpu.sbatch") if launcher == "slurm" else (templates.TPU, "tpu_pod.sh")
    point = Point("lr-1", {"optimizer.peak_lr": "1"}, ["optimizer.peak_lr=1", "train.run_dir=out/lr-1"], "out/lr-1")
    make_job = jobs.slurm_job if launcher == "slurm" else jobs.tpu_job
    job = make_job(point, str(tmp_path), "cfg.yaml", None)
    fixed = [line for line in template.splitlines() if "{{" not in line]
    for text in (job, templates.launch_script(script)):
        lines = text.splitlines()
        assert [line for line in lines if line in fixed] == fixed  # all of them, in order
    assert subprocess.run(["bash", "-n"], input=job, text=True).returncode == 0


def quickstart_module():
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "experiments", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_fim_tasks_are_lines_of_held_out_repositories(tmp_path):
    from sc_jax.data.documents import holdout_value
    from sc_jax.tokenizer import train_tokenizer

    qs = quickstart_module()
    names = [f"repo{i}" for i in range(8)]
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        body = "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(40))
        (tmp_path / name / "mod.py").write_text(body)
        (tmp_path / name / "notes.txt").write_text("not python\n")
    held = qs.heldout_repos(str(tmp_path), 0.5)
    assert held == sorted(n for n in names if holdout_value(n) < 0.5) and 0 < len(held) < len(names)
    tok = train_tokenizer([(tmp_path / n / "mod.py").read_text() for n in names], vocab_size=300)
    tasks = qs.heldout_fim_tasks(str(tmp_path), held, tok, n=20)
    assert len(tasks) == 20 and len({t.name for t in tasks}) == 20
    for t in tasks:
        repo, rest = t.name.split(os.sep, 1)
        assert repo in held and rest.startswith("mod.py:")
        text = (tmp_path / repo / "mod.py").read_text()
        lines = text.splitlines(keepends=True)
        line = int(rest.split(":")[1]) - 1
        assert t.middle == lines[line] and t.middle.strip()  # a whole non-blank line
        # Whole lines next to the gap, as many as fit in each side's token budget.
        counts = [len(tok.encode(x)) for x in lines]
        first, end = line - len(t.prefix.splitlines()), line + 1 + len(t.suffix.splitlines())
        assert t.prefix == "".join(lines[first:line]) and t.suffix == "".join(lines[line + 1:end])
        assert sum(counts[first:line]) <= qs.PREFIX_TOKENS < (sum(counts[first - 1:line]) if first else 10**9)
        assert sum(counts[line + 1:end]) <= qs.SUFFIX_TOKENS < (sum(counts[line + 1:end + 1]) if end < len(lines)
                                                                 else 10**9)
    assert qs.exact_matches(tasks, [t.middle for t in tasks]) == 20
    assert qs.exact_matches(tasks, ["pass\n"] * 20) == 0


def test_quickstart_reads_metrics_records_by_their_fields(tmp_path):
    qs = quickstart_module()
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 7.0, "time": 1.0, "tokens_total": 10}) + "\n"
                    + json.dumps({"step": 2, "loss": 6.0, "elapsed": 2.0}) + "\n"
                    + json.dumps({"step": 2, "eval_loss": 6.5, "eval_perplexity": 665.1, "kind": "eval"}) + "\n"
                    + json.dumps({"step": 2, "note": "something else"}) + "\n"
                    + '{"step": 3, "lo')  # a line cut by a crash
    train, evals = qs.read_metrics(str(path))
    assert [r["loss"] for r in train] == [7.0, 6.0] and [r["eval_loss"] for r in evals] == [6.5]
    png = tmp_path / "loss.png"
    qs.plot_losses(train, evals, 7.6, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = qs.results_table({"eval_loss": 7.6, "fim_hits": 0, "line_loss": 7.7},
                             {"step": 2, "eval_loss": 6.5, "fim_hits": 3, "line_loss": 6.1}, 64)
    assert table.splitlines()[1].split()[-2:] == ["7.600", "6.500"]
    assert table.splitlines()[-1].split()[-2:] == ["7.700", "6.100"]
    assert "0/64 (0%)" in table and "3/64 (5%)" in table and "step 2 (trained)" in table


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    from sc_jax.data.documents import holdout_value

    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "quickstart.py"), "--out", str(out),
                        "--steps", "40", "train.log_every=1", "logging.progress=false"],
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(x) for x in open(out / "run" / "metrics.jsonl")]
    losses = [x["loss"] for x in records if "loss" in x]
    assert len(losses) == 40 and losses[-1] < losses[0] - 0.5
    # The before/after table: step 0 is the untrained model (loss near ln(vocab)), and the
    # held-out loss fell. 40 steps teach no FIM yet, so exact match is only reported.
    results = json.load(open(out / "results.json"))
    before, after = results["step0"], results["trained"]
    assert abs(before["eval_loss"] - math.log(2048)) < 0.5 and after["step"] == 40
    assert after["eval_loss"] < before["eval_loss"] - 0.5 and after["line_loss"] < before["line_loss"] - 0.3
    assert [x["eval_loss"] for x in records if "eval_loss" in x] == [after["eval_loss"]]
    fraction = load_config(os.path.join(ROOT, "experiments", "configs", "quickstart.yaml")).data.holdout_fraction
    assert all(holdout_value(t["name"].split(os.sep)[0]) < fraction for t in results["fim_tasks"])
    for row in ("step 0 (untrained)", "step 40 (trained)", "held-out loss", "held-out perplexity",
                "FIM exact match, 64 held-out lines", "FIM masked-line loss", "--- the masked line"):
        assert row in r.stdout, row
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(out / "hf" / f)
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
