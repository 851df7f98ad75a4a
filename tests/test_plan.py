"""`python -m sc_jax.plan` options are checked before anything compiles: every bad value
gives the problem and the fix (in process here, fast; tests/test_bad_inputs_cli.py runs
the command line, tests/test_experiments.py the compiles)."""

import pytest

from sc_jax.plan import __main__ as plan
from sc_jax.train.step import PEAK_FLOPS


def check(*argv):
    return plan.check_args(plan.build_parser().parse_args(["--devices", "8", "--device-memory", "80", *argv]))


@pytest.mark.parametrize("argv,words", [
    (["--device-memory", "-1"], ("--device-memory", "positive", "-1.0")),
    (["--device-memory", "0"], ("--device-memory", "positive")),
    (["--device-memory", "nan"], ("--device-memory", "nan")),
    (["--device-memory", "inf"], ("--device-memory", "inf")),
    (["--mfu", "4"], ("--mfu", "(0, 1]", "4.0", "--mfu 0.4")),
    (["--mfu", "0"], ("--mfu", "(0, 1]")),
    (["--mfu", "-0.5"], ("--mfu",)),
    (["--mfu", "nan"], ("--mfu", "nan")),
    (["--devices", "0"], ("--devices", "at least 1")),
    (["--device-kind", "a1000"], ("'a1000'", "did you mean 'a100'?", "known: a100, ")),
    (["--device-kind", "h10"], ("did you mean 'h100'?",)),
    (["--device-kind", "gpu9000"], ("'gpu9000'", "known: a100")),
    (["--config", "/nonexistent/stage1.yaml"], ("--config", "not a file")),
])
def test_bad_options_name_the_problem_and_the_fix(argv, words):
    problem = check(*argv)
    assert problem is not None
    for word in words:
        assert word in problem, f"{word!r} not in {problem!r}"
    if "--device-kind" in argv:
        assert "did you mean 'cpu'" not in problem  # no far-fetched guesses


@pytest.mark.parametrize("kind", ["h100", "H100", "a100", "v5p", "v5e", "v6e", "h200", "v4", "cpu"])
def test_known_device_kinds_are_accepted_exactly(kind):
    assert check("--device-kind", kind) is None
    assert kind.lower() in PEAK_FLOPS


def test_every_kind_with_a_peak_is_listed_in_help():
    help_text = " ".join(plan.build_parser().format_help().split())
    assert plan.device_kinds() == sorted(PEAK_FLOPS)
    assert "one of " + ", ".join(sorted(PEAK_FLOPS)) in help_text
    assert "(default: h100)" in help_text and "(default: 0.4)" in help_text


def test_main_refuses_before_starting_the_fake_devices(monkeypatch, capsys):
    """A bad value never reaches the re-run with N fake devices (where the compile is)."""
    monkeypatch.setattr(plan, "_ensure_devices", lambda *a: pytest.fail("re-ran before checking the options"))
    assert plan.main(["--devices", "8", "--device-memory", "80", "--mfu", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mfu") and err.count("\n") == 1
