"""Bad inputs to `python -m sc_jax.eval`: each gives one `error:` line that names the problem
and the fix, exit code 2, no traceback, and leaves nothing behind; all are caught before
any program runs or any model loads (check-canonical --out FILE used to run all 164
programs first, then die with NotADirectoryError)."""

import gzip
import json
import os

import pytest
from cli_harness import BadInput, run_bad_input

EVAL = "sc_jax.eval"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sc_jax", "eval", "examples")
BIGCODE = os.path.join(EXAMPLES, "bigcode", "generations_humaneval.json")
PROBLEM = {"name": "HumanEval_0_x", "language": "py", "prompt": "def f():\n", "tests": "assert f() == 1\n",
           "stop_tokens": ["\ndef"]}
HUMANEVAL_RECORD = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n",
                    "canonical_solution": "    return 1\n"}


def _write(rel: str, text: str | bytes):
    def setup(d):
        path = os.path.join(d, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
    return setup


def _model_dir(d):
    os.makedirs(os.path.join(d, "model"))


def _both(*setups):
    def setup(d):
        for s in setups:
            s(d)
    return setup


def _gzip(rel: str, doc):
    return _write(rel, gzip.compress(json.dumps(doc).encode()))


ROWS = [
    BadInput("check-canonical --out is a file", EVAL, ["check-canonical", "--out", "results.txt"],
             ("--out results.txt", "is a file", "new directory"), setup=_write("results.txt", "keep me")),
    BadInput("--out is a directory that is not empty", EVAL, ["check-canonical", "--out", "old"],
             ("--out old", "not empty", "new or empty directory"), setup=_write("old/summary.md", "older run")),
    BadInput("--out under a file", EVAL, ["check-canonical", "--out", "f/run"],
             ("is a file, not a directory", "under a directory"), setup=_write("f", "x")),
    BadInput("--ckpt missing", EVAL, ["humaneval"], ("--ckpt", "required", "--help")),
    BadInput("--ckpt path does not exist", EVAL, ["humaneval", "--ckpt", "no_such_model"],
             ("checkpoint not found: no_such_model", "hugging face model directory")),
    BadInput("--tokenizer does not exist", EVAL, ["humaneval", "--ckpt", "model", "--tokenizer", "tok.json"],
             ("tokenizer not found: tok.json", "leave --tokenizer out"), setup=_model_dir),
    BadInput("damaged checkpoint", EVAL, ["humaneval", "--ckpt", "model", "--limit", "1"],
             ("cannot load checkpoint model",),
             setup=_both(_write("model/config.json", "{oops"), _write("model/tokenizer.json", "{oops"))),
    BadInput("--data missing", EVAL, ["humaneval", "--ckpt", "model", "--data", "none.jsonl"],
             ("data file not found: none.jsonl", "existing .jsonl"), setup=_model_dir),
    BadInput("--data garbled JSON", EVAL, ["humaneval", "--ckpt", "model", "--data", "bad.jsonl"],
             ("bad.jsonl:2", "malformed json", "fix that line"),
             setup=_both(_model_dir, _write("bad.jsonl", json.dumps(HUMANEVAL_RECORD) + "\n{oops\n"))),
    BadInput("--data not gzip", EVAL, ["humaneval", "--ckpt", "model", "--data", "bad.jsonl.gz"],
             ("bad.jsonl.gz", "cannot read", "gzip"), setup=_both(_model_dir, _write("bad.jsonl.gz", "plain"))),
    BadInput("--data record without a field", EVAL, ["multipl-e", "--ckpt", "model", "--data", "p.jsonl"],
             ("p.jsonl:1", "missing field 'tests'", "add it"),
             setup=_both(_model_dir, _write("p.jsonl", json.dumps({k: v for k, v in PROBLEM.items() if k != "tests"})))),
    BadInput("unknown language in --data", EVAL, ["multipl-e", "--ckpt", "model", "--data", "p.jsonl"],
             ("p.jsonl:1", "unknown language 'cobol'", "known:"),
             setup=_both(_model_dir, _write("p.jsonl", json.dumps({**PROBLEM, "language": "cobol"})))),
    BadInput("--n 0", EVAL, ["humaneval", "--ckpt", "model", "--n", "0"], ("--n", "must be >= 1, got 0"),
             setup=_model_dir),
    BadInput("--k larger than --n", EVAL, ["humaneval", "--ckpt", "model", "--n", "2", "--k", "1,5"],
             ("--k 5", "larger than --n 2", "lower --k or raise --n"), setup=_model_dir),
    BadInput("--k not a list of numbers", EVAL, ["score", "--samples", BIGCODE, "--k", "one"],
             ("--k", "comma-separated integers")),
    BadInput("--timeout 0", EVAL, ["check-canonical", "--timeout", "0"], ("--timeout", "must be > 0")),
    BadInput("--top-p above 1", EVAL, ["humaneval", "--ckpt", "model", "--top-p", "1.5"], ("--top-p", "<= 1")),
    BadInput("unknown FIM mode", EVAL, ["fim", "--ckpt", "model", "--mode", "words"], ("--mode", "invalid choice")),
    BadInput("--samples does not exist", EVAL, ["score", "--samples", "generations.json"],
             ("samples file not found: generations.json", "multipl-e completions", "bigcode")),
    BadInput("--samples malformed JSON", EVAL, ["score", "--samples", "generations.json"],
             ("generations.json", "malformed json", "line 1"), setup=_write("generations.json", '[["def f():"')),
    BadInput("--samples neither layout", EVAL, ["score", "--samples", "generations.json"],
             ("not a multipl-e completions file", "nor a bigcode-evaluation-harness generations file", "--help"),
             setup=_write("generations.json", '{"model": "x"}')),
    BadInput("--samples is the wrong layout for --format", EVAL, ["score", "--samples", BIGCODE, "--format", "multipl-e"],
             ("not a multipl-e completions file",)),
    BadInput("--samples with more problems than HumanEval", EVAL, ["score", "--samples", "generations.json"],
             ("200 problems", "humaneval has 164", "humaneval task"),
             setup=_write("generations.json", json.dumps([["x"]] * 200))),
    BadInput("--samples program is not a string", EVAL, ["score", "--samples", "generations.json"],
             ("entry 0 (humaneval/0)", "list of strings"), setup=_write("generations.json", json.dumps([[1]]))),
    BadInput("--samples of another task (or offset by --limit_start)", EVAL, ["score", "--samples", "generations.json"],
             ("entry 0 (humaneval/0)", "does not start with the problem's prompt", "in task order from humaneval/0"),
             setup=_write("generations.json", json.dumps([["def add(a, b):\n    return a + b\n"]]))),
    BadInput("--samples directory without completions", EVAL, ["score", "--samples", "empty"],
             ("empty", "no multipl-e completions files"), setup=lambda d: os.makedirs(os.path.join(d, "empty"))),
    BadInput("--samples unknown language", EVAL, ["score", "--samples", "mpe"],
             ("humaneval_0_x.json.gz", "unknown language 'cobol'"),
             setup=_gzip("mpe/HumanEval_0_x.json.gz", {**PROBLEM, "language": "cobol", "completions": ["x"]})),
    BadInput("--samples without completions", EVAL, ["score", "--samples", "mpe/HumanEval_0_x.json"],
             ("no completions", "generate some"), setup=_write("mpe/HumanEval_0_x.json", json.dumps(
                 {**PROBLEM, "completions": []}))),
    BadInput("--k larger than the samples of a problem", EVAL, ["score", "--samples", BIGCODE, "--k", "1,5"],
             ("--k 5", "larger than the fewest samples of a problem, 2")),
    BadInput("--data with MultiPL-E samples", EVAL,
             ["score", "--samples", os.path.join(EXAMPLES, "multipl-e", "py-canonical"), "--data", "x.jsonl"],
             ("--data is for bigcode generations only",)),
    # sql: every one caught before a server starts or a model loads
    BadInput("sql without a source of queries", EVAL, ["sql"], ("exactly one of --ckpt", "--samples", "--check-gold")),
    BadInput("sql with two sources", EVAL, ["sql", "--check-gold", "--samples", "s.jsonl"],
             ("exactly one of", "not --samples and --check-gold")),
    BadInput("sql --questions missing", EVAL, ["sql", "--check-gold", "--questions", "q.csv"],
             ("questions file not found: q.csv", "question, query, db_name, query_category")),
    BadInput("sql --questions without sql-eval's columns", EVAL, ["sql", "--check-gold", "--questions", "q.csv"],
             ("q.csv", "missing column(s) db_name, query_category", "sql-eval's layout"),
             setup=_write("q.csv", "question,query\nq,SELECT 1\n")),
    BadInput("sql --questions with an unknown database", EVAL, ["sql", "--check-gold", "--questions", "q.csv"],
             ("q.csv:2", "'nosuch' is not a defog-data database", "restaurants"),
             setup=_write("q.csv", "question,query,db_name,query_category\nq,SELECT 1,nosuch,where\n")),
    BadInput("sql --dsn not a connection string", EVAL, ["sql", "--check-gold", "--dsn", "not a dsn"],
             ("--dsn is not a libpq connection string", "postgresql://")),
    BadInput("sql --dsn server not running", EVAL,
             ["sql", "--check-gold", "--dsn", "host=/nonexistent port=5 password=secret"],
             ("cannot connect to database", "host=/nonexistent port=5'", "check --dsn", "--restore")),
    BadInput("sql --restore without --dsn", EVAL, ["sql", "--check-gold", "--restore"], ("--restore is for --dsn",)),
    BadInput("sql --dsn with --engine sqlite", EVAL, ["sql", "--check-gold", "--dsn", "host=x", "--engine", "sqlite"],
             ("--dsn is a postgresql server", "leave out --engine sqlite")),
    BadInput("sql --pg-bin without the server programs", EVAL, ["sql", "--check-gold", "--pg-bin", "."],
             ("initdb, pg_ctl, postgres not found in --pg-bin .", "apt-get install postgresql", "--engine sqlite")),
    BadInput("sql --sqlite-dir missing", EVAL, ["sql", "--check-gold", "--sqlite-dir", "dbs"],
             ("--sqlite-dir dbs is not a directory",)),
    BadInput("sql --sqlite-dir without the databases", EVAL, ["sql", "--check-gold", "--sqlite-dir", "dbs"],
             ("has no academic.sqlite or academic.db", "leave --sqlite-dir out"),
             setup=lambda d: os.makedirs(os.path.join(d, "dbs"))),
    BadInput("sql --samples without every question", EVAL, ["sql", "--samples", "s.jsonl", "--engine", "sqlite"],
             ("s.jsonl", "21 question(s) have no sample", "--limit"),
             setup=_write("s.jsonl", json.dumps({"index": 0, "completion": "SELECT 1"}) + "\n")),
    BadInput("sql --samples line without a query", EVAL, ["sql", "--samples", "s.jsonl", "--engine", "sqlite"],
             ("s.jsonl:1", "needs a string 'completion'", "'generated_query'"),
             setup=_write("s.jsonl", json.dumps({"index": 0}) + "\n")),
    BadInput("sql --prompt-file with an unknown placeholder", EVAL,
             ["sql", "--check-gold", "--engine", "sqlite", "--prompt-file", "p.md"],
             ("p.md", "unknown placeholder(s) {schema}", "{table_metadata_string}"),
             setup=_write("p.md", "{user_question}\n{schema}\n")),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row, tmp_path):
    run_bad_input(row, str(tmp_path))


def test_check_canonical_out_file_fails_before_any_program_runs(tmp_path):
    """The file given as --out is left as it was, and the refusal comes at once."""
    row = ROWS[0]
    res = run_bad_input(row, str(tmp_path))
    assert (tmp_path / "results.txt").read_text() == "keep me"
    assert "check-canonical:" not in res.stdout and "sandbox:" not in res.stderr
