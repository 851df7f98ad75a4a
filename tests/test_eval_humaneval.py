"""HumanEval / MultiPL-E data, stop strings, the evaluation loop and its report."""

import gzip
import json
import os
import shutil
import time

import pytest

from sc_jax.eval import humaneval as he
from sc_jax.eval.execution import SandboxConfig, UnknownLanguageError
from sc_jax.generate import cut_at_stop

PROBLEMS = he.load_humaneval()
CFG = SandboxConfig(timeout=10.0)


def test_humaneval_is_read_offline_from_the_package():
    path = he.humaneval_data_path()
    assert path.endswith("HumanEval.jsonl.gz") and os.path.isfile(path)
    assert len(PROBLEMS) == 164
    p = PROBLEMS[0]
    assert p.name == "HumanEval/0" and p.language == "python" and p.entry_point == "has_close_elements"
    assert p.tests.startswith("\n") and p.tests.endswith("\ncheck(has_close_elements)\n")
    assert p.program("X") == p.prompt + "X" + p.tests
    assert p.stop_tokens == ["\ndef", "\n#", "\nif", "\nclass", "\nprint"]
    assert len(he.load_humaneval(limit=3)) == 3


def test_cut_at_stop():
    stops = he.PYTHON_STOP_TOKENS
    assert cut_at_stop("    return 1\n\ndef g():\n    pass", stops) == "    return 1\n"
    assert cut_at_stop("    if x:\n        return 1\nif __name__", stops) == "    if x:\n        return 1"
    assert cut_at_stop("    return 1\nprint(f(2))\n# done", stops) == "    return 1"
    assert cut_at_stop("    return 1", stops) == "    return 1"
    assert cut_at_stop("abc", ["", "c"]) == "ab"


def test_all_canonical_solutions_pass_through_the_cli_path(tmp_path):
    """The 164 canonical solutions via the oracle complete_fn, exactly as `check-canonical` runs."""
    from sc_jax.eval.__main__ import main

    rc = main(["check-canonical", "--workers", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "humaneval" / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["problems"] == 164 and row["passed"] == 164 and row["pass@1"] == 1.0
    lines = (tmp_path / "humaneval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 164
    rec = json.loads(lines[0])
    assert {"problem", "sample", "completion", "status", "passed", "exit_code", "wall_time", "stderr"} <= set(rec)
    assert (tmp_path / "humaneval" / "summary.md").read_text().startswith("| benchmark |")


def test_empty_completions_fail(tmp_path):
    report = he.evaluate(PROBLEMS, he.empty_complete_fn, n=1, workers=2, config=CFG, progress=False,
                         out_dir=str(tmp_path))
    row = report.summary["rows"][0]
    assert row["passed"] == 0 and row["pass@1"] == 0.0 and row["failed"] + row["timeout"] == 164
    assert "| humaneval | python | 164 | 1 | 0.00 |" in report.markdown


def test_sampling_loop_pass_at_k_and_stop_cut():
    """n samples per problem; every other sample right; completions get cut at stop strings;
    batches of near-equal size (16 = 6 + 5 + 5, not 6 + 6 + 4: one padded shape, one compile)."""
    probs = PROBLEMS[:4]
    oracle = he.oracle_complete_fn(probs)
    calls = []

    def flaky(prompts, *, max_new_tokens, temperature, top_p, top_k, stop, seed):
        done = sum(c[0] for c in calls)
        calls.append((len(prompts), temperature, seed, tuple(stop)))
        right = oracle(prompts)
        # trailing junk after a stop string must be removed by the harness
        return [r + "\n\nprint('junk')\nraise SystemExit(1)\n" if (done + i) % 2 == 0 else "    return None\n"
                for i, r in enumerate(right)]

    report = he.evaluate(probs, flaky, n=4, temperature=0.8, seed=7, batch_size=6, workers=2, config=CFG,
                         progress=False)
    assert [c[0] for c in calls] == [6, 5, 5] and [c[2] for c in calls] == [7, 8, 9]
    assert all(c[1] == 0.8 and c[3] == tuple(he.PYTHON_STOP_TOKENS) for c in calls)
    row = report.summary["rows"][0]
    assert row["n"] == 4 and row["samples"] == 16 and row["passed"] == 8
    per = report.summary["per_problem"]
    assert sorted(v["c"] for v in per.values()) == [2, 2, 2, 2]
    assert row["pass@1"] == pytest.approx(0.5)
    assert "pass@10" not in row
    assert not any("junk" in r["completion"] for r in report.records)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


JS_PROBLEMS = [
    {
        "name": "JS_0_add",
        "language": "js",
        "prompt": "//Add two numbers\nfunction add(a, b){\n",
        "tests": "\nconst assert = require('node:assert');\n\nfunction test() {\n  let candidate = add;\n"
                 "  assert.deepEqual(candidate(1, 2),3);\n  assert.deepEqual(candidate(-1, 1),0);\n}\n\ntest();\n",
        "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"],
        "canonical_solution": "  return a + b;\n}\n",
    },
    {
        "name": "JS_1_rev",
        "language": "js",
        "prompt": "//Reverse a string\nfunction rev(s){\n",
        "tests": "\nconst assert = require('node:assert');\nassert.deepEqual(rev('abc'), 'cba');\n",
        "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"],
        "canonical_solution": "  return s.split('').reverse().join('');\n}\n",
    },
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_multipl_e_javascript(tmp_path):
    path = _write_jsonl(tmp_path / "js.jsonl", JS_PROBLEMS)
    probs = he.load_multipl_e(path)
    assert [p.language for p in probs] == ["js", "js"] and probs[0].stop_tokens[0] == "\nfunction "
    good = he.evaluate(probs, he.oracle_complete_fn(probs), n=1, workers=2, config=CFG, progress=False,
                       benchmark="multipl-e-js")
    assert good.all_passed and good.summary["rows"][0]["language"] == "js"
    bad = he.evaluate(probs, he.empty_complete_fn, n=1, workers=2, config=CFG, progress=False)
    assert bad.summary["rows"][0]["passed"] == 0


def test_multipl_e_gz_and_mixed_languages(tmp_path):
    py = {"name": "py_0", "language": "py", "prompt": "def f():\n", "tests": "\nassert f() == 1\n",
          "stop_tokens": ["\ndef"], "canonical_solution": "    return 1\n"}
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in [py, JS_PROBLEMS[0]]:
            f.write(json.dumps(r) + "\n\n")
    probs = he.load_multipl_e(str(path))
    assert [p.name for p in probs] == ["py_0", "JS_0_add"]
    if shutil.which("node"):
        report = he.evaluate(probs, he.oracle_complete_fn(probs), n=1, workers=2, config=CFG, progress=False)
        langs = [r["language"] for r in report.summary["rows"]]
        assert langs == ["js", "py", "all"] and report.all_passed


def test_bad_data_gives_one_line_errors(tmp_path):
    with pytest.raises(he.DataError, match="data file not found"):
        he.load_multipl_e(str(tmp_path / "nope.jsonl"))
    good = json.dumps(JS_PROBLEMS[0])
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", '{"name": "x", "prompt": '])
    with pytest.raises(he.DataError, match=r"bad\.jsonl:3: malformed JSON"):
        he.load_multipl_e(path)
    path = _write_jsonl(tmp_path / "missing.jsonl", [{k: v for k, v in JS_PROBLEMS[0].items() if k != "tests"}])
    with pytest.raises(he.DataError, match=r"missing\.jsonl:1: missing field 'tests'"):
        he.load_multipl_e(path)
    path = _write_jsonl(tmp_path / "lang.jsonl", [good, dict(JS_PROBLEMS[0], language="cobol")])
    with pytest.raises(UnknownLanguageError, match=r"lang\.jsonl:2: unknown language 'cobol'"):
        he.load_multipl_e(path)
    path = _write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(he.DataError, match=r"list\.jsonl:1: expected a JSON object"):
        he.load_multipl_e(path)
    path = _write_jsonl(tmp_path / "stops.jsonl", [dict(JS_PROBLEMS[0], stop_tokens="\n")])
    with pytest.raises(he.DataError, match="stop_tokens"):
        he.load_multipl_e(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(he.DataError, match="no problems"):
        he.load_multipl_e(str(tmp_path / "empty.jsonl"))


def test_batches_are_near_equal_so_one_padded_shape_compiles():
    """164 samples in batches of at most 32: 28+28+27+27+27+27, every batch padded to 32
    rows by the generator (one compilation), not 5 x 32 + 4 (a second one for 4 rows)."""
    def padded(rows):  # what the generator pads a batch to
        return 1 << (rows - 1).bit_length()

    batches = he.split_batches(list(range(164)), 32)
    assert [len(b) for b in batches] == [28, 28, 27, 27, 27, 27]
    assert sum(batches, []) == list(range(164)) and {padded(len(b)) for b in batches} == {32}
    assert [len(b) for b in he.split_batches(list(range(64)), 32)] == [32, 32]
    assert he.split_batches([], 8) == [] and [len(b) for b in he.split_batches([1, 2, 3], 8)] == [3]


def test_programs_run_while_generating_and_the_bar_counts_each(monkeypatch):
    """Each batch's programs start as soon as it is generated (the second batch waits here
    until a first-batch program has finished), and the bar moves once per finished program."""
    from sc_jax.eval import execution as ex

    ticks, notes = [], []
    update, note = ex._Progress.update, getattr(ex._Progress, "note", None)

    def counting_update(self, res):
        update(self, res)
        ticks.append((self.done, self.total))

    def recording_note(self, text):
        note(self, text)
        notes.append(text)

    monkeypatch.setattr(ex._Progress, "update", counting_update)
    monkeypatch.setattr(ex._Progress, "note", recording_note, raising=False)
    probs = PROBLEMS[:3]
    oracle = he.oracle_complete_fn(probs)
    calls, finished_before_next_batch = [], []

    def complete(prompts, **_kw):
        calls.append(len(prompts))
        if len(calls) > 1:
            deadline = time.monotonic() + 10
            while not ticks and time.monotonic() < deadline:
                time.sleep(0.02)
            finished_before_next_batch.append(bool(ticks))
        return oracle(prompts)

    report = he.evaluate(probs, complete, n=2, batch_size=2, workers=2, config=CFG, progress=True)
    assert report.all_passed and calls == [2, 2, 2]
    assert finished_before_next_batch == [True, True]
    assert ticks == [(i, 6) for i in range(1, 7)]
    assert notes[0] == "generated 0/6" and notes[-1] == "generated 6/6"


def test_reports_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    """Outputs go to a temporary sibling renamed into place at the end: a failure while
    writing leaves neither the directory nor the temporary behind."""
    probs = PROBLEMS[:2]
    report = he.evaluate(probs, he.oracle_complete_fn(probs), n=1, workers=2, config=CFG, progress=False)
    write = he.write_report

    def disk_full(rep, out_dir):
        write(rep, out_dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(he, "write_report", disk_full)
    with pytest.raises(he.EvalError, match="cannot write the results .* No space left"):
        he.save_reports({"humaneval": report}, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(he, "write_report", write)
    he.save_reports({"humaneval": report}, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out" / "humaneval")) == sorted(he.REPORT_FILES)
    assert report.out_dir == str(tmp_path / "out" / "humaneval")
    with pytest.raises(he.EvalError, match="exists and is not empty"):
        he.save_reports({"": report}, str(tmp_path / "out"))
