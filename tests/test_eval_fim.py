"""Fill-in-the-middle benchmark built from HumanEval canonical solutions."""

import pytest

from sc_jax.eval import fim
from sc_jax.eval import humaneval as he
from sc_jax.eval.execution import EvalError, SandboxConfig

PROBLEMS = he.load_humaneval()
CFG = SandboxConfig(timeout=10.0)
SHORT = SandboxConfig(timeout=3.0)  # an empty middle can turn a loop infinite


@pytest.mark.parametrize("mode", fim.MODES)
def test_tasks_are_deterministic_and_reassemble(mode):
    a = fim.build_fim_tasks(PROBLEMS, mode=mode, seed=0)
    b = fim.build_fim_tasks(PROBLEMS, mode=mode, seed=0)
    c = fim.build_fim_tasks(PROBLEMS, mode=mode, seed=1)
    assert len(a) == 164 and a == b
    assert [t.start_line for t in a] != [t.start_line for t in c]
    for t, p in zip(a, PROBLEMS):
        sol = p.canonical_solution if p.canonical_solution.endswith("\n") else p.canonical_solution + "\n"
        assert t.prefix + t.middle + t.suffix == p.prompt + sol
        assert t.prefix.startswith(p.prompt) and t.middle.strip()
        assert t.middle.count("\n") == t.num_lines
        if mode == "line":
            assert t.num_lines == 1
    if mode == "span":
        assert max(t.num_lines for t in a) > 2 and sum(t.num_lines >= 2 for t in a) > 100


def test_normalize_and_exact_match():
    assert fim.normalize_middle("    return x", "line") == "    return x\n"
    assert fim.normalize_middle("    return x\n    junk\n", "line") == "    return x\n"
    assert fim.normalize_middle("", "line") == "\n"
    assert fim.normalize_middle("a\nb", "span") == "a\nb\n"
    assert fim.normalize_middle("", "span") == ""
    assert fim.exact_match("    return x  \n", "    return x\n")
    assert not fim.exact_match("return x\n", "    return x\n")
    with pytest.raises(EvalError, match="unknown FIM mode"):
        fim.build_fim_tasks(PROBLEMS[:1], mode="char")


@pytest.mark.parametrize("mode", fim.MODES)
def test_oracle_infill_scores_100(mode, tmp_path):
    tasks = fim.build_fim_tasks(PROBLEMS, mode=mode)
    report = fim.evaluate_fim(tasks, fim.oracle_infill_fn(tasks), workers=2, config=CFG, progress=False,
                              out_dir=str(tmp_path))
    (row,) = report.summary["rows"]
    assert row["benchmark"] == f"fim-{mode}" and row["problems"] == 164
    assert row["pass@1"] == 1.0 and row["exact_match"] == 1.0, [
        (r["problem"], r["stderr"][-200:]) for r in report.records if not r["passed"]]
    assert "exact match" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("mode", fim.MODES)
def test_empty_infill_scores_about_zero(mode):
    tasks = fim.build_fim_tasks(PROBLEMS, mode=mode)[::4]  # 41 tasks: the full set is in the slow test
    calls = []

    def empty(prefixes, suffixes, *, max_new_tokens, temperature, top_p, top_k, seed):
        calls.append((len(prefixes), seed))
        return fim.empty_infill_fn(prefixes, suffixes)

    report = fim.evaluate_fim(tasks, empty, workers=2, config=SHORT, progress=False, batch_size=16, seed=3)
    assert calls == [(14, 3), (14, 4), (13, 5)]  # 41 in near-equal batches of at most 16
    row = report.summary["rows"][0]
    assert row["exact_match"] == 0.0 and row["pass@1"] <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("mode", fim.MODES)
def test_empty_infill_full(mode):
    tasks = fim.build_fim_tasks(PROBLEMS, mode=mode)
    report = fim.evaluate_fim(tasks, fim.empty_infill_fn, workers=2, config=SHORT, progress=False)
    assert report.summary["rows"][0]["pass@1"] <= 0.05
