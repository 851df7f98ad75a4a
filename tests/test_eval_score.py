"""`python -m sc_jax.eval score`: completions made by MultiPL-E or bigcode-evaluation-harness,
scored with the humaneval command's protocol, on the samples shipped in sc_jax/eval/examples."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from sc_jax.eval import humaneval as he
from sc_jax.eval import score
from sc_jax.eval.__main__ import main
from sc_jax.eval.execution import SandboxConfig
from sc_jax.generate import cut_at_stop

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sc_jax", "eval", "examples")
CFG = SandboxConfig(timeout=10.0)
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")


def _example(*parts):
    return os.path.join(EXAMPLES, *parts)


def _score(path, **kw):
    samples = score.load_samples(path, **kw)
    report = he.execute_samples(samples.benchmark, samples.tasks, samples.samples, workers=2, config=CFG,
                                progress=False, ks=(1, 2))
    return samples, report


@pytest.mark.parametrize("path, name, want", [
    (("multipl-e", "py-canonical"), "multipl-e-py", 1.0),
    (("multipl-e", "py-broken"), "multipl-e-py", 0.0),
    (("bigcode", "generations_humaneval_broken.json"), "bigcode-humaneval", 0.0),
    pytest.param(("multipl-e", "js-canonical"), "multipl-e-js", 1.0, marks=needs_node),
    pytest.param(("multipl-e", "js-broken"), "multipl-e-js", 0.0, marks=needs_node),
])
def test_shipped_samples_score_all_or_nothing(path, name, want):
    samples, report = _score(_example(*path))
    (row,) = report.summary["rows"]
    assert samples.benchmark == name and row["benchmark"] == name and row["n"] == 2
    assert row["pass@1"] == want and row["pass@2"] == want, [(r["problem"], r["reason"]) for r in report.records]
    if want == 0.0:  # the broken sets hold early exits: exit code 0 that must not count
        assert any(r["exit_code"] == 0 and r["completed"] is False for r in report.records)


def test_score_command_end_to_end_bigcode(tmp_path):
    """The CLI on bigcode's generations file: pass@k per k, per-sample and per-problem files."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "sc_jax.eval", "score", "--samples",
                          _example("bigcode", "generations_humaneval.json"), "--k", "1,2", "--workers", "2",
                          "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| bigcode-humaneval | python | 3 | 2 | 100.00 | 100.00 |" in res.stdout
    assert sorted(os.listdir(out)) == sorted(he.REPORT_FILES)
    per_problem = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [p["problem"] for p in per_problem] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(p["n"] == 2 and p["c"] == 2 and p["pass@1"] == 1.0 and p["pass@2"] == 1.0 for p in per_problem)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["layout"] == "bigcode" and summary["rows"][0]["pass@2"] == 1.0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6


def test_score_command_multipl_e_file_and_limit(tmp_path, capsys):
    """One MultiPL-E file (gzip) instead of a directory; --limit; --format named."""
    one = _example("multipl-e", "py-canonical", "HumanEval_0_has_close_elements.json.gz")
    assert main(["score", "--samples", one, "--format", "multipl-e", "--out", str(tmp_path / "a"),
                 "--workers", "2", "--no-progress"]) == 0
    assert "| multipl-e-py | py | 1 | 2 | 100.00 |" in capsys.readouterr().out
    assert main(["score", "--samples", _example("multipl-e", "py-broken"), "--limit", "2", "--out",
                 str(tmp_path / "b"), "--workers", "2", "--no-progress"]) == 0
    assert "| multipl-e-py | py | 2 | 2 | 0.00 |" in capsys.readouterr().out


def test_programs_are_built_as_the_other_harnesses_build_them():
    """MultiPL-E: prompt + completion + "\\n" + tests (evaluation/src/main.py); bigcode:
    generation + "\\n" + ("\\n" + test + "\\n" + "check(entry)") (humaneval.get_reference,
    code_eval); completions cut at the stop strings either way."""
    mpe = score.load_samples(_example("multipl-e", "py-canonical"))
    doc = score.read_json(_example("multipl-e", "py-canonical", "HumanEval_2_truncate_number.json"))
    task = next(t for t in mpe.tasks if t.name == doc["name"])
    cut = cut_at_stop(doc["completions"][1], doc["stop_tokens"])
    assert cut == doc["completions"][0] + "\n"  # the shipped second sample: the first + "\n\ndef unused..."
    assert task.program(cut) == doc["prompt"] + cut + "\n" + doc["tests"]

    big = score.load_samples(_example("bigcode", "generations_humaneval.json"))
    raw = next(rec for _, rec in he.read_jsonl(he.humaneval_data_path()) if rec["task_id"] == "HumanEval/2")
    generations = score.read_json(_example("bigcode", "generations_humaneval.json"))[2]
    program = big.tasks[2].program(big.samples[2][1])
    assert program == generations[1] + "\n" + "\n" + raw["test"] + "\n" + f"check({raw['entry_point']})" + "\n"
    assert big.samples[2][0] == raw["prompt"].strip() + "\n" + raw["canonical_solution"] + "\n"  # junk cut away
    problem = he.load_humaneval(limit=1)[0]
    assert score.cut_program("print('no prompt')", problem) is None


def test_multipl_e_completion_without_final_newline_meets_tests_on_a_new_line(tmp_path):
    """A completion cut at "\\ndef" ends without a newline, and MultiPL-E's Python tests start
    with "def check": the program must join them with "\\n" (as MultiPL-E does), for the
    `multipl-e` command as for `score`, not glue "return 1def check"."""
    rec = {"name": "py_1", "language": "py", "prompt": "def one():\n", "stop_tokens": ["\ndef"],
           "tests": "def check(candidate):\n    assert candidate() == 1\n\ncheck(one)\n"}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    problems = he.load_multipl_e(str(path))
    complete = lambda prompts, **_kw: ["    return 1\ndef more():\n    pass\n" for _ in prompts]  # noqa: E731
    report = he.evaluate(problems, complete, n=1, workers=1, config=CFG, progress=False)
    assert report.records[0]["completion"] == "    return 1" and report.all_passed, report.records[0]["stderr"]
    with gzip.open(tmp_path / "py_1.json.gz", "wt") as f:
        json.dump({**rec, "completions": ["    return 1"]}, f)
    (tmp_path / "py_1.results.json").write_text("{}")  # MultiPL-E's own output beside it: skipped
    samples, report = _score(str(tmp_path))
    assert [t.name for t in samples.tasks] == ["py_1"] and report.all_passed


def test_layouts_are_told_apart_and_mismatches_refused(tmp_path):
    bigcode = _example("bigcode", "generations_humaneval.json")
    assert score.load_samples(bigcode).layout == "bigcode"
    assert score.load_samples(_example("multipl-e", "py-broken")).layout == "multipl-e"
    with pytest.raises(he.DataError, match="not a MultiPL-E completions file"):
        score.load_samples(bigcode, layout="multipl-e")
    (tmp_path / "odd.json").write_text('{"name": "x"}')
    with pytest.raises(he.DataError, match="nor a bigcode-evaluation-harness generations file"):
        score.load_samples(str(tmp_path / "odd.json"))
    with pytest.raises(he.DataError, match="--data is for bigcode generations only"):
        score.load_samples(_example("multipl-e", "py-broken"), data=he.humaneval_data_path())
