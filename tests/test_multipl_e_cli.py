"""`python -m sc_jax.eval multipl-e --data FILE... --languages ...`: MultiPL-E rows of several
languages (JSONL and parquet) through generate -> sandbox -> report, with the paper's one-row
table; and its bad inputs (one `error:` line, exit 2, nothing left behind)."""

import json
import os
import sys
import types

import pytest
from cli_harness import BadInput, run_bad_input

from sc_jax.eval import humaneval as he
from sc_jax.eval.__main__ import main
from test_multipl_e_languages import COMPLETIONS, fixture_path, require_toolchain

EVAL = "sc_jax.eval"
LANGS = ("php", "lua", "rust")  # one compiled language; the cheap scripted ones


class _FixtureGenerator:
    """What `load_generator` returns: answers each fixture prompt with its correct completion, except
    php's below_zero (wrong), so the table is not all 100."""

    def __init__(self):
        self.answers = {}
        for lang in LANGS:
            problems = {p.name: p for p in he.load_multipl_e(fixture_path(lang))}
            for case, (name, text) in COMPLETIONS[lang].items():
                if case == ("wrong_below_zero" if lang == "php" else "correct_below_zero") or case == "correct":
                    self.answers[problems[name].prompt] = text
            self.answers[problems["sandbox_add"].prompt] = COMPLETIONS[lang]["correct"][1]
        self.stops = []

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, top_k, stop, seed):
        self.stops.append(stop)
        return [self.answers[p] for p in prompts]


@pytest.fixture
def fake_generate(monkeypatch):
    gen = _FixtureGenerator()
    mod = types.ModuleType("sc_jax.generate")
    mod.load_generator = lambda path, **kw: gen
    monkeypatch.setitem(sys.modules, "sc_jax.generate", mod)
    return gen


def test_several_languages_one_paper_table(fake_generate, tmp_path, capsys):
    for lang in LANGS:
        require_toolchain(lang)
    import pyarrow as pa
    import pyarrow.parquet as pq

    lua_rows = [json.loads(line) for line in open(fixture_path("lua"), encoding="utf-8")]
    pq.write_table(pa.Table.from_pylist(lua_rows), tmp_path / "humaneval-lua.parquet")
    ckpt = tmp_path / "my-model"
    ckpt.mkdir()
    out = tmp_path / "out"
    rc = main(["multipl-e", "--ckpt", str(ckpt), "--n", "1", "--data", fixture_path("php"),
               str(tmp_path / "humaneval-lua.parquet"), fixture_path("rust"), "--languages", "rs,php,lua",
               "--out", str(out), "--workers", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    # php: add and sandbox_add pass, below_zero fails -> 66.67
    assert "| model | rs | php | lua |\n|---|---|---|---|\n| my-model | 100.00 | 66.67 | 100.00 |" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["language"]: r for r in summary["rows"]}
    assert set(rows) == {"php", "lua", "rs", "all"} and rows["php"]["failed"] == 1
    assert "| my-model | 100.00 | 66.67 | 100.00 |" in (out / "summary.md").read_text()
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["problem"] for r in recs} >= {"php/HumanEval_53_add", "rs/HumanEval_53_add", "lua/sandbox_add"}
    assert ["\n}"] in fake_generate.stops  # each language's own stop tokens reach the generator


def _setup(d):
    os.makedirs(os.path.join(d, "model"))


ROWS = [
    BadInput("--languages names an unknown language", EVAL,
             ["multipl-e", "--ckpt", "model", "--data", fixture_path("php"), "--languages", "php,cobol"],
             ("--languages", "unknown language 'cobol'"), setup=_setup),
    BadInput("--languages asks for a language --data lacks", EVAL,
             ["multipl-e", "--ckpt", "model", "--data", fixture_path("php"), "--languages", "php,cpp"],
             ("--languages php,cpp", "no problems in 'cpp'", "give its multipl-e file too"), setup=_setup),
    BadInput("the same --data file twice", EVAL,
             ["multipl-e", "--ckpt", "model", "--data", fixture_path("php"), fixture_path("php")],
             ("given twice", "each multipl-e file once"), setup=_setup),
    BadInput("--data is not parquet", EVAL, ["multipl-e", "--ckpt", "model", "--data", "x.parquet"],
             ("x.parquet", "cannot read as parquet"),
             setup=lambda d: (_setup(d), open(os.path.join(d, "x.parquet"), "w").write("text"))),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_bad_input(row, tmp_path):
    run_bad_input(row, str(tmp_path))


def test_score_multipl_e_completions_files_of_new_languages(tmp_path):
    """MultiPL-E's own completions files (one per problem, a directory per language) for Lua and PHP."""
    for lang in ("lua", "php"):
        require_toolchain(lang)
        row = json.loads(open(fixture_path(lang), encoding="utf-8").readline())  # HumanEval_53_add
        doc = {**row, "completions": [COMPLETIONS[lang]["correct"][1], COMPLETIONS[lang]["wrong"][1]],
               "temperature": 0.2, "top_p": 0.95, "max_tokens": 512}
        (tmp_path / lang).mkdir()
        (tmp_path / lang / f"{row['name']}.json").write_text(json.dumps(doc))
        out = tmp_path / f"out-{lang}"
        assert main(["score", "--samples", str(tmp_path / lang), "--k", "1", "--out", str(out), "--no-progress"]) == 0
        (summary_row,) = json.loads((out / "summary.json").read_text())["rows"]
        assert summary_row["language"] == lang and summary_row["pass@1"] == 0.5 and summary_row["failed"] == 1
