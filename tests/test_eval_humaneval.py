"""HumanEval / MultiPL-E data, stop strings, the evaluation loop and its report."""

import gzip
import json
import os
import shutil

import pytest

from sc_jax.eval import humaneval as he
from sc_jax.eval.execution import SandboxConfig, UnknownLanguageError

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


def test_truncate_at_stop():
    stops = he.PYTHON_STOP_TOKENS
    assert he.truncate_at_stop("    return 1\n\ndef g():\n    pass", stops) == "    return 1\n"
    assert he.truncate_at_stop("    if x:\n        return 1\nif __name__", stops) == "    if x:\n        return 1"
    assert he.truncate_at_stop("    return 1\nprint(f(2))\n# done", stops) == "    return 1"
    assert he.truncate_at_stop("    return 1", stops) == "    return 1"
    assert he.truncate_at_stop("abc", ["", "c"]) == "ab"


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
    """n samples per problem; every other sample right; completions get cut at stop strings."""
    probs = PROBLEMS[:4]
    oracle = he.oracle_complete_fn(probs)
    calls = []

    def flaky(prompts, *, max_new_tokens, temperature, top_p, top_k, stop, seed):
        calls.append((len(prompts), temperature, seed, tuple(stop)))
        right = oracle(prompts)
        # trailing junk after a stop string must be removed by the harness
        return [r + "\n\nprint('junk')\nraise SystemExit(1)\n" if i % 2 == 0 else "    return None\n"
                for i, r in enumerate(right)]

    report = he.evaluate(probs, flaky, n=4, temperature=0.8, seed=7, batch_size=6, workers=2, config=CFG,
                         progress=False)
    assert [c[0] for c in calls] == [6, 6, 4] and [c[2] for c in calls] == [7, 8, 9]
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
