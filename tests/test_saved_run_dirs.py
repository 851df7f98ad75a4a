"""A run directory saved by earlier code resumes under this code to the losses that code's
uninterrupted run had.

tests/fixtures/run_dirs/synthetic/ is a run of a tiny custom model (hidden 32, one layer,
vocab 64) on synthetic data, stopped with a checkpoint at step 3 of 6; losses.json holds the
overrides it ran with and the losses of the same run trained straight through, both written
by generate.py with the commit named there."""

import json
import os
import shutil

from sc_jax.train import load_config, run

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_dirs")
with open(os.path.join(FIXTURES, "losses.json")) as _f:
    SAVED = json.load(_f)


def losses(run_dir) -> dict[str, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {str(r["step"]): r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_the_run_directory_was_saved_by_a_named_commit_mid_run():
    assert len(SAVED["saved_by"]) >= 7
    saved = os.path.join(FIXTURES, "synthetic")
    assert os.listdir(os.path.join(saved, "checkpoints")) == [str(SAVED["saved_at"])]
    assert sorted(losses(saved), key=int) == [str(s) for s in range(1, SAVED["saved_at"] + 1)]


def resume(tmp_path, capsys, overrides=()) -> dict[str, float]:
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(FIXTURES, "synthetic"), run_dir)
    summary = run(load_config(None, SAVED["overrides"] + [f"train.run_dir={run_dir}", *overrides]))
    out = capsys.readouterr().out
    assert f"resumed from step {SAVED['saved_at']}" in out and "warning" not in out
    assert summary["step"] == len(SAVED["losses"]) and summary["trained"]
    return losses(run_dir)


def test_a_run_directory_saved_by_an_earlier_commit_resumes_to_its_losses(tmp_path, capsys):
    """On the attention path that commit's `auto` took on the CPU (chunked; model.attention
    is resume-safe): exact, every step, the saved ones and the resumed ones."""
    assert resume(tmp_path, capsys, ["model.attention=chunked"]) == SAVED["losses"]


def test_it_resumes_on_the_cpu_attention_kernel_within_fp32_rounding(tmp_path, capsys):
    """`auto` now takes the CPU attention kernel, which sums in another order: the saved
    steps are as saved, the resumed ones within fp32 rounding of that commit's."""
    got = resume(tmp_path, capsys)
    assert got.keys() == SAVED["losses"].keys()
    for step, loss in SAVED["losses"].items():
        if int(step) <= SAVED["saved_at"]:
            assert got[step] == loss, step
        else:
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
