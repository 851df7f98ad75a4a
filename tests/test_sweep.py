"""Sweeps: a 2x2 grid of tiny synthetic runs trains, summarizes, skips what is done,
re-runs what is missing, resumes what is partial; bad keys fail before training;
job scripts for SLURM and TPU pods carry each point's overrides and actually run."""

import csv
import json
import math
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from sc_jax.sweep.__main__ import main as sweep_cli
from sc_jax.sweep.grid import Point, point_name, short_keys
from sc_jax.sweep.status import SWEEP_ERROR, point_result

# As tests/test_train.py's BASE, with checkpoints (resume) and one device (faster compiles).
TINY = {"model": {"preset": "tiny"}, "mesh": {"num_devices": 1},
        "optimizer": {"warmup_steps": 1},
        "train": {"data": "synthetic", "seq_len": 32, "global_batch_size": 8},
        "checkpoint": {"every": 2}, "logging": {"progress": False, "tensorboard": False}}
GRID = ["--grid", "optimizer.peak_lr=1e-3,3e-3", "--grid", "model.partial_rotary_factor=0.25,1.0"]
NAMES = ["peak_lr-1e-3_partial_rotary_factor-0.25", "peak_lr-1e-3_partial_rotary_factor-1.0",
         "peak_lr-3e-3_partial_rotary_factor-0.25", "peak_lr-3e-3_partial_rotary_factor-1.0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A config file and a compile cache shared by every sweep in this module."""
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return {"root": root, "config": str(config), "cache": str(root / "compile_cache")}


def args(env, out, *extra):
    return ["--config", env["config"], *GRID, "--steps", "4", "--out", str(out), "--compile-cache", env["cache"],
            *extra]


def sweep_main(capsys, argv):
    rc = sweep_cli(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def summary_rows(out):
    with open(os.path.join(out, "summary.csv")) as f:
        return {r["point"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def done_sweep(env):
    """The 2x2 sweep, trained once for the module (its points end complete after every test)."""
    out = env["root"] / "grid"
    assert sweep_cli(args(env, out)) == 0
    return out


def test_local_sweep_trains_every_point_and_summarizes(done_sweep):
    rows = summary_rows(done_sweep)
    assert list(rows) == NAMES
    for name, r in rows.items():
        assert r["status"] == "done" and r["steps_done"] == "4"
        assert all(math.isfinite(float(r[c])) for c in ("first_loss", "final_loss", "tokens_per_sec"))
        assert float(r["final_loss"]) < float(r["first_loss"])
        assert [m["step"] for m in metrics(done_sweep / name)] == [1, 2, 3, 4]
        cfg = yaml.safe_load(open(done_sweep / name / "config.yaml"))
        assert cfg["train"]["steps"] == 4 and cfg["optimizer"]["peak_lr"] == float(r["optimizer.peak_lr"])
        assert cfg["model"]["partial_rotary_factor"] == float(r["model.partial_rotary_factor"])
    assert rows[NAMES[2]]["final_loss"] < rows[NAMES[0]]["final_loss"]  # the higher learning rate learns faster
    md = (done_sweep / "summary.md").read_text()
    assert sum(line.startswith("| peak_lr-") for line in md.splitlines()) == 4
    assert "| optimizer.peak_lr | model.partial_rotary_factor |" in md and "last 10% of logged steps" in md
    png = (done_sweep / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_rerun_skips_finished_points(env, done_sweep, capsys):
    before = {n: (done_sweep / n / "metrics.jsonl").read_bytes() for n in NAMES}
    rc, out, _ = sweep_main(capsys, args(env, done_sweep))
    assert rc == 0
    assert out.count("skipped: already at step 4/4") == 4 and "parameters |" not in out  # nothing trained
    for i, n in enumerate(NAMES, 1):
        assert f"[{i}/4] {n}" in out
    assert {n: (done_sweep / n / "metrics.jsonl").read_bytes() for n in NAMES} == before
    assert out.count("| done |") == 4  # the markdown table is printed


def test_deleted_point_is_rerun_alone(env, done_sweep, capsys):
    shutil.rmtree(done_sweep / NAMES[1])
    rc, out, _ = sweep_main(capsys, args(env, done_sweep))
    assert rc == 0
    assert out.count("skipped:") == 3 and out.count("parameters |") == 1
    assert f"[2/4] {NAMES[1]}\n" in out and "  done: step 4/4, loss" in out
    assert [m["step"] for m in metrics(done_sweep / NAMES[1])] == [1, 2, 3, 4]
    assert summary_rows(done_sweep)[NAMES[1]]["status"] == "done"


def test_partial_point_resumes_and_finishes(env, done_sweep, capsys):
    shutil.rmtree(done_sweep / NAMES[3])
    rc, out, _ = sweep_main(capsys, args(env, done_sweep, "train.stop_after_steps=2"))
    assert rc == 0 and "stopped: step 2/4" in out
    assert summary_rows(done_sweep)[NAMES[3]]["status"] == "partial (2/4)"
    rc, out, _ = sweep_main(capsys, args(env, done_sweep))
    assert rc == 0 and out.count("skipped:") == 3
    assert "resumed from step 2" in out and "warning" not in out
    assert [m["step"] for m in metrics(done_sweep / NAMES[3])] == [1, 2, 3, 4]
    assert summary_rows(done_sweep)[NAMES[3]]["status"] == "done"


def test_bad_grid_key_fails_before_training(env, capsys, tmp_path):
    rc, out, err = sweep_main(capsys, ["--config", env["config"], "--grid", "optimizer.peak_rl=1e-3,3e-3",
                                       "--steps", "4", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert err.startswith("error:") and "'optimizer.peak_rl'" in err and "did you mean 'peak_lr'" in err
    assert err.count("\n") == 1 and "(point" not in err and not os.path.exists(tmp_path / "bad")
    # A value that only one point gets wrong names that point.
    rc, _, err = sweep_main(capsys, ["--config", env["config"], "--grid", "train.seq_len=32,9999", "--steps", "4",
                                     "--out", str(tmp_path / "bad")])
    assert rc == 2 and "max_position_embeddings" in err and "(point seq_len-9999)" in err
    for bad in (["--grid", "optimizer.peak_lr"], ["--grid", "train.steps=1,2"], ["--grid", "model.dtype=a,a"],
                ["--grid", "train.seed=0,1", "train.seed=3"]):
        rc, _, err = sweep_main(capsys, ["--config", env["config"], "--steps", "4", "--out", str(tmp_path / "bad"), *bad])
        assert rc == 2 and err.startswith("error:") and err.count("\n") == 1, (bad, err)


def test_failed_points_are_recorded_and_the_sweep_goes_on(env, tmp_path, capsys):
    # 8 devices: micro-batches of 4 or 2 sequences cannot be split 8 ways (fails in setup, before compiling).
    out = tmp_path / "fail"
    rc, stdout, err = sweep_main(capsys, ["--config", env["config"], "--grid", "train.micro_batches=2,4",
                                          "--steps", "4", "--out", str(out), "mesh.num_devices=8"])
    assert rc == 1 and "2 point(s) failed" in err
    assert "[2/2] micro_batches-4" in stdout  # the second point ran after the first failed
    rows = summary_rows(out)
    for name, per_micro in (("micro_batches-2", 4), ("micro_batches-4", 2)):
        assert rows[name]["status"] == (f"failed: a micro-batch of {per_micro} sequences (train.global_batch_size / "
                                        "train.micro_batches) cannot be split over data x fsdp = 8 devices: "
                                        "make it a multiple of 8")
    assert (out / "micro_batches-2" / SWEEP_ERROR).exists()
    # The same with a child process per point: the child's error line is what is recorded.
    rc, stdout, err = sweep_main(capsys, ["--config", env["config"], "--grid", "train.micro_batches=2", "--subprocess",
                                          "--steps", "4", "--out", str(out), "mesh.num_devices=8"])
    assert rc == 1 and "error: a micro-batch of 4 sequences" in stdout
    assert summary_rows(out)["micro_batches-2"]["status"] == rows["micro_batches-2"]["status"]


def _fake_tool(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_and_tpu_job_scripts_carry_the_overrides_and_run(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "jobs_sweep"
    rc, stdout, _ = sweep_main(capsys, args(env, out, "--launcher", "slurm", "train.seed=0"))
    assert rc == 0 and "submit:  bash" in stdout and "--summarize-only" in stdout
    jobs = out / "jobs"
    assert sorted(os.listdir(jobs)) == sorted([f"{n}.sbatch" for n in NAMES] + ["submit_all.sh"])
    for n in NAMES:
        text = (jobs / f"{n}.sbatch").read_text()
        lr, prf = n.split("_partial_rotary_factor-")
        assert text.startswith("#!/bin/bash") and f"#SBATCH --job-name=sweep-{n}" in text
        cmd = [line for line in text.splitlines() if line.startswith("srun ")][0]
        assert f"--config {env['config']} train.seed=0 optimizer.peak_lr={lr[len('peak_lr-'):]} " \
               f"model.partial_rotary_factor={prf} train.run_dir={out / n} train.steps=4" in cmd
        assert subprocess.run(["bash", "-n", jobs / f"{n}.sbatch"]).returncode == 0
    submit = (jobs / "submit_all.sh").read_text()
    assert [line for line in submit.splitlines() if line.startswith("sbatch")] == \
        [f'sbatch "$@" {n}.sbatch' for n in NAMES]

    # Run one job as SLURM would (srun = run the command here), then the TPU script of another
    # through a gcloud that runs --command locally; the summary then shows both points done.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "srun", 'exec "$@"\n')
    _fake_tool(bin_dir, "gcloud", 'echo "$@" > "$(dirname "$0")/gcloud_args"\n'
                                  'for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done\n'
                                  'exit 9\n')
    env_vars = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable,
                    TPU_NAME="pod", TPU_ZONE="zone-a", SC_JAX_DIR=os.getcwd())
    run = subprocess.run(["bash", jobs / f"{NAMES[0]}.sbatch"], env=env_vars, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

    rc, stdout, _ = sweep_main(capsys, args(env, out, "--launcher", "tpu", "train.seed=0"))
    assert rc == 0 and "TPU_NAME=... TPU_ZONE=..." in stdout
    tpu_script = jobs / f"{NAMES[2]}.sh"
    text = tpu_script.read_text()
    assert "--worker=all" in text and f"model.partial_rotary_factor=0.25 train.run_dir={out / NAMES[2]}" in text
    submit = (jobs / "submit_all.sh").read_text()
    assert f"# Already done, not submitted: {NAMES[0]}" in submit
    assert [line.split(" ||")[0] for line in submit.splitlines() if line.startswith("bash ")] == \
        [f"bash {n}.sh" for n in NAMES[1:]]
    run = subprocess.run(["bash", tpu_script], env=env_vars, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (bin_dir / "gcloud_args").read_text().split()[:6] == \
        ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=zone-a"]

    rc, stdout, _ = sweep_main(capsys, args(env, out, "--summarize-only", "train.seed=0"))
    assert rc == 0 and "parameters |" not in stdout
    rows = summary_rows(out)
    assert [rows[n]["status"] for n in NAMES] == ["done", "not run", "done", "not run"]
    assert math.isfinite(float(rows[NAMES[2]]["final_loss"]))


def test_summary_statistics_from_a_run_directory(tmp_path):
    run_dir = tmp_path / "p"
    run_dir.mkdir()
    recs = [{"step": s, "loss": 10.0 - s, **({"tokens_per_sec": 100.0 * s} if s > 1 else {})} for s in range(1, 21)]
    recs.insert(10, {"step": 10, "eval_loss": 7.5})
    recs.append({"step": 20, "eval_loss": 6.5})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"step\": 21, \"lo")
    r = point_result(Point("p", {"k": "1"}, [], str(run_dir)), 20)
    assert r["steps_done"] == 20 and r["status"] == "done" and r["first_loss"] == 9.0
    assert r["final_loss"] == pytest.approx((-9.0 + -10.0) / 2)  # last 10% of 20 logged steps: 2
    assert r["eval_loss"] == 6.5 and r["tokens_per_sec"] == pytest.approx(1100.0)  # median of steps 2..20
    assert point_result(Point("p", {}, [], str(run_dir)), 40)["status"] == "partial (20/40)"


def test_point_names_are_stable_and_readable():
    keys = ["data.fim_rate", "model.partial_rotary_factor"]
    shorts = short_keys(keys)
    assert point_name({"data.fim_rate": "0", "model.partial_rotary_factor": "0.25"}, shorts) == \
        "fim_rate-0_partial_rotary_factor-0.25"
    assert short_keys(["optimizer.x.lr", "train.y.lr", "model.dtype"]) == \
        {"optimizer.x.lr": "x.lr", "train.y.lr": "y.lr", "model.dtype": "dtype"}
    assert point_name({"data.tokenizer": "a/b c"}, {"data.tokenizer": "tokenizer"}) == "tokenizer-a_b_c"


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        sweep_cli(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--config", "--grid", "--steps", "--out", "--launcher", "--subprocess", "--summarize-only",
                 "--compile-cache", "--log-y", "summary.csv", "loss_curves.png", "submit_all.sh", "exit codes"):
        assert word in text, word


def test_a_legacy_mixed_run_directory_is_not_another_experiment(tmp_path):
    """config.yaml written before data.weight_unit existed (>= 2 sources): the trainer resumes it
    mixed by documents, so the sweep must not call it another run; a real change still shows."""
    from sc_jax.config import to_dict
    from sc_jax.sweep.status import config_changes
    from sc_jax.train.config import Config, from_dict

    data = {"sources": [{"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 0.8},
                        {"kind": "jsonl", "path": str(tmp_path / "b.jsonl"), "weight": 0.2}]}
    cfg = from_dict(Config, {**TINY, "train": {**TINY["train"], "data": "mixture"}, "data": data})
    saved = to_dict(cfg)
    del saved["data"]["weight_unit"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(str(tmp_path), cfg) == []
    assert cfg.data.weight_unit == "tokens"  # compared as resumed, the caller's config is untouched
    cfg.optimizer.peak_lr = 0.5
    assert [c.split(":")[0] for c in config_changes(str(tmp_path), cfg)] == ["optimizer.peak_lr"]
