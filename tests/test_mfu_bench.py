"""bench/mfu.py and the planner's remat table: the default plan's choices (each point after
the ones before it), the budget, the HFU arithmetic and the table, on faked children (fast,
no jax); the launch environment the GPU launchers and the bench share; the plan's
per-policy memory; and, marked slow, the real `--dry-run` and `--flops --dry-run`."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mfu", os.path.join(ROOT, "bench", "mfu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mfu"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


mfu = load_bench()


# ----------------------------------------------------------------------------- arguments


def problem(*argv):
    return mfu.check_args(mfu.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("argv,words", [
    (["--configs", "cudnn:full:4"], ("ATTENTION:REMAT:BATCH:SEQ",)),
    (["--configs", "flash:full:4:4096"], ("attention 'flash'", "cudnn")),
    (["--configs", "cudnn:fulll:4:4096"], ("remat 'fulll'", "save_dot_except_mlp")),
    (["--configs", "cudnn:full:four:4096"], ("whole numbers",)),
    (["--configs", "cudnn:full:3:4096:2"], ("multiple of the micro-batches",)),
    (["--configs", ","], ("no configuration",)),
    (["--budget-s", "0"], ("--budget-s", "positive")),
    (["--timeout-s", "nan"], ("--timeout-s",)),
    (["--preset", "stable-code-7b"], ("--preset", "stable-code-3b")),
    (["--seq", "4q"], ("--seq", "4k")),
    (["--policies", "none,sometimes"], ("'sometimes'",)),
    (["--set", "model.remat"], ("KEY=VALUE",)),
    (["--flops", "--configs", "cudnn:full:4:4096"], ("--flops", "CPU")),
])
def test_bad_options_name_the_problem(argv, words):
    text = problem(*argv)
    assert text is not None
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


def test_bad_option_is_one_error_line_and_exit_2(capsys):
    assert mfu.main(["--configs", "cudnn:full:4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --configs") and err.count("\n") == 1


def test_configs_parse_with_k_suffix_and_micro_batches():
    points = mfu.parse_configs("cudnn:full:4:4096, cudnn:minimal:8:16k:2")
    assert [(p.attention, p.remat, p.batch, p.seq, p.micro) for p in points] == [
        ("cudnn", "full", 4, 4096, 1), ("cudnn", "minimal", 8, 16384, 2)]
    assert points[1].name == "cudnn minimal 8x16384 m2"


def test_help_shows_defaults_and_the_device_command():
    text = " ".join(mfu.build_parser().format_help().split())
    assert "(default: 500; 110 with --dry-run)" in text and "(default: cudnn)" in text
    assert "python3 bench/mfu.py --out $OUT/results.json --budget-s 500" in text


# ----------------------------------------------------------------------------- the plan, faked


class Clock:
    """A stand-in for the time module: each faked child advances it."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    def perf_counter(self):
        return self.now


def fake_children(monkeypatch, outcomes, clock, cost=30.0):
    """run_child answering from `outcomes`: {(remat, batch, seq, micro, xla): status or tokens/s}."""
    calls = []

    def run_child(job, env, timeout):
        clock.now += cost if job["what"] == "step" else 10.0
        if job["what"] == "calibrate":
            return ({"status": "ok", "platform": "gpu", "device_kind": "NVIDIA H200", "versions": {"jax": "0.test"},
                     "peak_tflops": 989.0, "matmul": {"n": 8192, "s": 1.4e-3, "tflops": 780.0},
                     "memory": {"bytes_limit": 125 * GIB}, "attn_shape": [2, 4096, 32, 32, 80], "wall_s": 10.0,
                     "attention": [{"path": "cudnn", "ms": 2.5, "temp_bytes": GIB},
                                   {"path": "reference", "error": "out of memory"}]}, "ok", "")
        p = job["point"]
        calls.append(mfu.Point(**p).name)
        out = outcomes[(p["remat"], p["batch"], p["seq"], p["micro"], p["xla"])]
        if isinstance(out, str):
            return {"status": out, "error": f"{out} here"}, "ok", ""
        tokens = p["batch"] * p["seq"]
        return ({"status": "ok", "batch": p["batch"], "seq": p["seq"], "attention_path": p["attention"],
                 "step_s": tokens / out, "tokens_per_s": float(out), "model_tflops": out * 18e9 / 1e12,
                 "mfu": out * 18e9 / 989e12, "peak_bytes": 60 * GIB, "compiled_bytes": 58 * GIB,
                 "compile_s": 40.0}, "ok", "")

    monkeypatch.setattr(mfu, "run_child", run_child)
    monkeypatch.setattr(mfu, "time", types.SimpleNamespace(time=clock.time, perf_counter=clock.perf_counter))
    monkeypatch.setenv("XLA_FLAGS", "")  # the user's own (empty): no probe of the launch flags
    return calls


def run_plan(tmp_path, capsys, *argv):
    out = tmp_path / "results.json"
    rc = mfu.main(["--out", str(out), "--no-hfu", *argv])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return rc, capsys.readouterr().out, records


def test_default_plan_adapts_to_each_result(tmp_path, capsys, monkeypatch):
    clock = Clock()
    calls = fake_children(monkeypatch, {
        ("full", 4, 4096, 1, None): 10_000,
        ("save_dot_except_mlp", 4, 4096, 1, None): 12_000,
        ("minimal", 4, 4096, 1, None): "oom",  # out of memory when run: retried at half the batch
        ("minimal", 2, 4096, 1, None): 11_000,
        ("save_dot_except_mlp", 8, 4096, 1, None): "does-not-fit",  # the fastest at 2x: then 2 micro-batches
        ("save_dot_except_mlp", 8, 4096, 2, None): 12_500,
        ("save_dot_except_mlp", 1, 16384, 1, None): 6_000,
        ("save_dot_except_mlp", 8, 4096, 2, ""): 12_100,
    }, clock)
    rc, stdout, records = run_plan(tmp_path, capsys, "--budget-s", "1000")
    assert rc == 0
    assert calls == ["cudnn full 4x4096", "cudnn save_dot_except_mlp 4x4096", "cudnn minimal 4x4096",
                     "cudnn minimal 2x4096", "cudnn save_dot_except_mlp 8x4096", "cudnn save_dot_except_mlp 8x4096 m2",
                     "cudnn save_dot_except_mlp 1x16384", "cudnn save_dot_except_mlp 8x4096 m2 xla=defaults"]
    kinds = [r["kind"] for r in records]
    assert kinds[:2] == ["env", "calibration"] and kinds[-1] == "summary" and kinds.count("step") == 8
    env = records[0]
    assert env["env_sources"]["XLA_FLAGS"] == "environment" and env["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"]
    assert "| cudnn save_dot_except_mlp 8x4096 m2 | 8 x 4096 | ok |" in stdout
    assert "| cudnn save_dot_except_mlp 8x4096 | 8 x 4096 | does-not-fit" in stdout
    assert "fastest at 4096: cudnn save_dot_except_mlp 8x4096 m2, 12,500 tokens/s" in stdout
    assert "| cudnn | 2.50 | 1.0 |" in stdout and "780 TFLOP/s (79% of the 989 TFLOP/s peak)" in stdout
    xla = [r for r in records if r["kind"] == "step"][-1]
    assert xla["xla_flags"] == "" and xla["point"]["xla"] == ""


def test_the_budget_skips_what_does_not_fit_in_it(tmp_path, capsys, monkeypatch):
    clock = Clock()
    fake_children(monkeypatch, {
        ("full", 4, 4096, 1, None): 10_000,
        ("save_dot_except_mlp", 4, 4096, 1, None): 12_000,
        ("minimal", 4, 4096, 1, None): 11_000,
    }, clock, cost=100.0)
    rc, stdout, records = run_plan(tmp_path, capsys, "--budget-s", "350")
    assert rc == 0
    skipped = [r for r in records if r["kind"] == "skipped"]
    # 10 s calibration + 3 x 100 s: 40 s left, under each later point's need (45, 60, 90 s)
    assert [r["name"] for r in skipped] == ["cudnn save_dot_except_mlp 8x4096", "cudnn save_dot_except_mlp 1x16384",
                                            "cudnn save_dot_except_mlp 4x4096 xla=defaults"]
    assert "| cudnn save_dot_except_mlp 1x16384 | 1 x 16384 | skipped: 40 s of the budget left" in stdout


def test_hfu_is_mfu_times_the_counted_recompute_of_the_policy():
    rec = {"status": "ok", "name": "x", "batch": 4, "seq": 4096, "step_s": 1.0, "tokens_per_s": 16384.0,
           "mfu": 0.30, "model_tflops": 296.7, "attention_path": "cudnn",
           "point": {"remat": "full", "micro": 1, "xla": None, "attention": "cudnn"}}
    none = dict(rec, point=dict(rec["point"], remat="none"))
    ref = dict(rec, attention_path="reference")
    factors = {(4096, "full", "fused"): 1.25, (4096, "full", "reference"): 1.40}
    rows = mfu.summary_rows([rec, none, ref], {"matmul": {"tflops": 790.0}}, factors)
    assert rows[0]["hfu"] == pytest.approx(0.375) and rows[0]["of_matmul"] == pytest.approx(296.7 / 790)
    assert rows[1]["hfu"] == pytest.approx(0.30)  # no remat: nothing recomputed
    assert rows[2]["hfu"] == pytest.approx(0.42)  # the reference core is inside the recomputed region
    assert mfu.summary_rows([rec], None, {})[0]["hfu"] is None  # not counted: no HFU, not a guess


# ----------------------------------------------------------------------------- the launch environment


def test_launch_env_sets_only_what_the_user_left_unset(monkeypatch):
    from sc_jax.sweep.templates import gpu_env_defaults

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")
    env, sources = mfu.launch_env(dry_run=False)
    assert env["XLA_FLAGS"] == gpu_env_defaults()["XLA_FLAGS"] and sources["XLA_FLAGS"] == "launch default"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8" and sources["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "environment"
    monkeypatch.setenv("XLA_FLAGS", "")
    env, _ = mfu.launch_env(dry_run=True)
    assert env["XLA_FLAGS"] == "" and env["JAX_PLATFORMS"] == "cpu"


def gpu_env_of_the_slurm_script(environment: dict) -> dict:
    """Runs the SLURM launcher's environment lines in bash with `environment`."""
    text = open(os.path.join(ROOT, "experiments", "launch", "slurm_gpu.sbatch")).read()
    block = re.search(r"^export XLA_PYTHON_CLIENT_MEM_FRACTION.*?^fi$", text, re.M | re.S).group(0)
    script = "set -euo pipefail\n" + block + '\nprintf "%s\\n%s" "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$XLA_FLAGS"\n'
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}
    out = subprocess.run(["bash", "-c", script], env={**env, **environment}, capture_output=True, text=True, check=True)
    fraction, flags = out.stdout.split("\n")
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction, "XLA_FLAGS": flags}


def test_the_slurm_launcher_sets_the_same_defaults_unless_the_user_did():
    from sc_jax.sweep.templates import gpu_env_defaults

    assert gpu_env_of_the_slurm_script({}) == gpu_env_defaults()
    mine = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert gpu_env_of_the_slurm_script(mine) == mine
    assert gpu_env_of_the_slurm_script({"XLA_FLAGS": ""})["XLA_FLAGS"] == ""  # empty: XLA's own defaults


def test_the_library_sets_no_launch_environment():
    """Only launchers (templates) and bench/ set XLA_FLAGS / the memory fraction."""
    for dirpath, _, files in os.walk(os.path.join(ROOT, "sc_jax")):
        for name in files:
            path = os.path.join(dirpath, name)
            if not name.endswith(".py") or path.endswith(os.path.join("sweep", "templates.py")):
                continue
            text = open(path).read()
            assert not re.search(r"environ\[[\"'](XLA_FLAGS|XLA_PYTHON_CLIENT_MEM_FRACTION)[\"']\]\s*=", text), path


# ----------------------------------------------------------------------------- the plan's remat table


def test_plan_compiles_each_remat_policy_and_says_which_fit():
    from sc_jax.plan import plan, remat_lines, report
    from sc_jax.train import load_config

    cfg = load_config(None, ["model.preset=tiny", "train.seq_len=32", "train.global_batch_size=8", "mesh.num_devices=1",
                             "model.attention=chunked", "model.remat=full", "train.data=synthetic"])
    r = plan(cfg, devices=1, device_memory_gb=1, device_kind="h100", mfu=0.4, remat_policies=("full", "none"))
    rows = {row["policy"]: row for row in r["remat"]}
    assert list(rows) == ["none", "full"]  # least recompute first
    assert rows["full"]["temporaries"] == r["temporaries"]  # the configured one is not compiled twice
    assert rows["none"]["temporaries"] > rows["full"]["temporaries"] and rows["none"]["fits"]
    text = report(cfg, r, 1, "h100", 0.4)
    assert "model.remat policies" in text and "full *" in text
    assert "expected fastest that fits: model.remat=none" in text
    # the same table with a capacity between the two: only full fits, and says so
    cap = (r["total"] + rows["none"]["total"]) / 2 / 0.92
    r2 = dict(r, capacity=cap, remat=[dict(row, fits=row["total"] <= 0.92 * cap) for row in r["remat"]])
    assert "expected fastest that fits: model.remat=full" in "\n".join(remat_lines(cfg, r2))


def test_plan_advice_names_the_fastest_policy_that_fits():
    from sc_jax.plan import GIB, advice
    from sc_jax.train import load_config

    cfg = load_config(None, ["model.preset=tiny", "model.remat=none", "train.seq_len=32"])
    r = {"mesh": {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}, "temporaries": 9 * GIB, "total": 10 * GIB,
         "params": GIB // 2, "optimizer": GIB // 2,
         "remat": [{"policy": "none", "fits": False, "total": 10 * GIB, "error": None},
                   {"policy": "minimal", "fits": False, "total": 8 * GIB, "error": None},
                   {"policy": "save_dot_except_mlp", "fits": True, "total": 5 * GIB, "error": None},
                   {"policy": "full", "fits": True, "total": 3 * GIB, "error": None}]}
    tips = advice(cfg, r)
    assert tips[0].startswith("model.remat=save_dot_except_mlp (now 'none'): fits at 5.0 GiB/device")
    assert not any(t.startswith("model.remat=full") for t in tips)


def test_plan_remat_policies_option_is_checked():
    from sc_jax.plan import __main__ as plan_cli

    def check(*argv):
        return plan_cli.check_args(plan_cli.build_parser().parse_args(["--devices", "8", "--device-memory", "80",
                                                                       *argv]))

    assert "did you mean 'full'?" in check("--remat-policies", "none,ful")
    assert check("--remat-policies", "all") is None and check("--remat-policies", "off") is None
    assert plan_cli.remat_policies("off") == () and "full" in plan_cli.remat_policies("all")


# ----------------------------------------------------------------------------- the real thing (CPU)


@pytest.mark.slow
def test_dry_run_runs_the_whole_plan_on_the_cpu(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mfu.py"), "--dry-run", "--out", str(out),
                        "--budget-s", "400"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [x for x in records if x["kind"] == "step"]
    assert records[1]["kind"] == "calibration" and records[1]["status"] == "ok"
    assert all(x["status"] == "ok" and x["finite"] for x in steps), steps
    assert {x["point"]["remat"] for x in steps} >= {"full", "minimal", "save_dot_except_mlp"}
    assert any(x["seq"] == 256 for x in steps) and any(x["point"]["xla"] == "" for x in steps)
    assert "| configuration | batch x seq |" in r.stdout and "fastest at 64:" in r.stdout
    summary = records[-1]
    # the CPU has no peak FLOP/s (no MFU, no HFU), but the recompute factors are counted
    assert summary["kind"] == "summary" and all(row["recompute"] for row in summary["rows"] if row["seq"] == 64)


@pytest.mark.slow
def test_flops_counts_the_recompute_of_each_policy(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mfu.py"), "--flops", "--dry-run",
                        "--policies", "none,full"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| 64 |")]
    assert lines and all(cells[-2].strip() for cells in lines), r.stdout  # every policy counted
    rows = {(cells[2].strip(), cells[3].strip()): float(cells[-2]) for cells in lines}
    assert rows[("none", "-")] == 1.0
    assert rows[("full", "recomputed (reference)")] > rows[("full", "kept (cudnn, splash, chunked)")] > 1.0
