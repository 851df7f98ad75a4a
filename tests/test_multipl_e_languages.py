"""MultiPL-E's compiled and scripted languages (C++, Java, Go, Rust, PHP, Lua, TypeScript) in the
sandbox: per language, problems in MultiPL-E's released layout (tests/fixtures/multipl_e, written
by make_fixtures.py) with completions that pass, fail, loop, exit(0) early, do not compile, and
try to write outside, open a socket and start a process storm.

Every program of every language runs once, all in one ProgramPool (module fixture): compiling
costs seconds per program, so they overlap. A toolchain that is missing fails these tests under
CI (``.ci/run`` installs them all) and skips them elsewhere, naming the package to install.
"""

import json
import os
import socket
import uuid

import pytest

from sc_jax.eval import execution as ex
from sc_jax.eval import humaneval as he
from sc_jax.eval.execution import Program, ProgramPool, SandboxConfig
from test_eval_execution import _gone as _nothing_left  # no process of the run survives it

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "multipl_e")
LANGUAGES = ("cpp", "java", "go", "rust", "php", "lua", "typescript")
COMPLETIONS = json.load(open(os.path.join(FIXTURES, "completions.json"), encoding="utf-8"))
CAPS = ex.sandbox_capabilities()
#: MultiPL-E's 15 s per program; the loops are cut at 3 s. max_processes: the storms' wall
CONFIG = SandboxConfig(timeout=15.0, max_processes=64)
LOOP_TIMEOUT = 3.0
STORM_ATTEMPTS = 300  # the storm programs stop at this many processes (they never fork-bomb)
HOSTILE = ("write_outside", "socket", "storm")


def fixture_path(lang: str) -> str:
    return os.path.join(FIXTURES, f"humaneval-{lang}.jsonl")


def require_toolchain(lang: str) -> None:
    """Fails under CI (`.ci/run` installs every toolchain), skips elsewhere; naming the package."""
    try:
        ex.get_executor(lang).resolve()
    except ex.ExecutorUnavailableError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the {lang} toolchain (.ci/run installs it): {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def escape_names():
    names = {lang: f"sc_eval_escape_{lang}_{uuid.uuid4().hex}" for lang in LANGUAGES}
    yield names
    for name in names.values():
        for d in ("/tmp", "/var/tmp"):
            if os.path.exists(os.path.join(d, name)):
                os.unlink(os.path.join(d, name))


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def results(escape_names, listener):
    """{(lang, case): ExecResult} for every case of every language whose toolchain is here."""
    port = listener.getsockname()[1]
    programs = {}
    for lang in LANGUAGES:
        if not ex.get_executor(lang).available():
            continue
        problems = {p.name: p for p in he.load_multipl_e(fixture_path(lang))}
        for case, (name, text) in COMPLETIONS[lang].items():
            text = text.replace("@NAME@", escape_names[lang]).replace("@PORT@", str(port))
            problem = problems[name]
            timeout = LOOP_TIMEOUT if case == "loop" else None
            programs[(lang, case)] = Program(problem.program(text), problem.language, timeout=timeout)
    with ProgramPool(total=len(programs), workers=max(2, os.cpu_count() or 2), config=CONFIG,
                     progress=False) as pool:
        for key, program in programs.items():
            pool.submit(key, program)
        return pool.wait()


def _result(results, lang, case):
    require_toolchain(lang)
    return results[(lang, case)]


def test_fixtures_are_multipl_e_rows():
    for lang in LANGUAGES:
        rows = [json.loads(line) for line in open(fixture_path(lang), encoding="utf-8")]
        assert len(rows) == 3
        for row in rows:
            assert {"name", "language", "prompt", "tests", "stop_tokens"} <= set(row)
            assert ex.get_executor(row["language"]).language == lang
        assert set(COMPLETIONS[lang]) >= {"correct", "wrong", "loop", "exit0", "compile_error", *HOSTILE}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_correct_completions_pass(results, lang):
    for case in [c for c in COMPLETIONS[lang] if c.startswith("correct")]:
        res = _result(results, lang, case)
        assert res.status == "passed" and res.completed is True, (case, res.stage, res.stdout, res.stderr)
        _nothing_left(res)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_wrong_completions_fail_at_run_time(results, lang):
    for case in [c for c in COMPLETIONS[lang] if c.startswith("wrong")]:
        res = _result(results, lang, case)
        assert res.status == "failed" and res.stage == "run" and res.exit_code != 0, (case, res.stderr)
        assert res.completed is False


@pytest.mark.parametrize("lang", LANGUAGES)
def test_infinite_loop_times_out(results, lang):
    res = _result(results, lang, "loop")
    assert res.status == "timeout" and res.stage == "run", (res.stage, res.stderr)
    assert ex.describe_failure(res) == "timed out"
    _nothing_left(res)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_exit_0_before_the_tests_end_fails(results, lang):
    res = _result(results, lang, "exit0")
    assert res.status == "failed" and res.completed is False, (res.exit_code, res.stdout, res.stderr)
    if lang != "go":  # `go test` turns os.Exit(0) in a test into a failure itself; syscall.Exit gets 0 through
        assert res.exit_code == 0


@pytest.mark.parametrize("lang", LANGUAGES)
def test_compile_error_is_reported_as_such(results, lang):
    res = _result(results, lang, "compile_error")
    assert res.status == "compile_error" and res.stage == "compile" and res.exit_code != 0, (res.stdout, res.stderr)
    reason = ex.describe_failure(res)
    assert reason.startswith("compile error: ") and "exit code" not in reason, reason  # the compiler's diagnostic


@pytest.mark.parametrize("lang", LANGUAGES)
def test_write_outside_its_directory_is_refused(results, lang, escape_names):
    res = _result(results, lang, "write_outside")
    leaked = [d for d in ("/tmp", "/var/tmp") if os.path.exists(os.path.join(d, escape_names[lang]))]
    if CAPS["filesystem"] and CAPS["unprivileged_user"]:
        assert res.status == "passed", (res.stdout, res.stderr)  # the program saw every write refused
        assert leaked == []
    else:  # honest fallback: shared temp dirs stay writable without a mount namespace
        assert res.isolation["filesystem"] is False


@pytest.mark.parametrize("lang", LANGUAGES)
def test_socket_to_the_host_is_cut(results, lang, listener):
    res = _result(results, lang, "socket")
    if CAPS["network"]:
        assert res.isolation["network"] is True
        assert res.status == "passed" and "connected" not in res.stdout, (res.stdout, res.stderr)
    else:
        assert res.isolation["network"] is False


def test_no_connection_reached_the_host(results, listener):
    ran = [lang for lang in LANGUAGES if (lang, "socket") in results]
    assert ran, "no language ran"
    try:
        conn, _ = listener.accept()
        conn.close()
        accepted = True
    except BlockingIOError:
        accepted = False
    assert accepted is not bool(CAPS["network"])


@pytest.mark.parametrize("lang", LANGUAGES)
def test_process_storm_is_contained(results, lang):
    res = _result(results, lang, "storm")
    if CAPS["unprivileged_user"]:
        # the program stopped at RLIMIT_NPROC (or its runtime failed to start threads): contained
        spawned = [int(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith("spawned")]
        assert spawned and max(spawned) < CONFIG.max_processes < STORM_ATTEMPTS, res.stdout
        assert res.status in ("passed", "failed"), (res.status, res.stderr)
    _nothing_left(res)


# ----------------------------------------------------------------------------- sentinels, cheap


def test_cpp_sentinel_ends_the_tests_main_and_wraps_it():
    from sc_jax.eval.languages import cpp_sentinel

    src = ('long f() {\n    return 1;\n}\nint main() {\n    assert(f() == 1); // }\n    std::string s = "}{";\n'
           "    char c = '}';\n    /* } */\n}\n")
    out = cpp_sentinel(src, "/w/.done", "abc")
    assert "int main() {\n    assert" not in out and "int sc_eval_tests_main() {" in out
    body_end = out.index("/* } */\n") + len("/* } */\n")
    assert out[body_end:].startswith("    return 0;\n}")  # falling off a non-main function is undefined
    assert out.rstrip().endswith("}") and '"abc"' in out and "sc_eval_tests_main();" in out
    assert cpp_sentinel("int f() { return 0; }\n", "/w", "n") == "int f() { return 0; }\n"  # no main: no nonce


def test_rust_lua_php_java_go_sentinels():
    from sc_jax.eval import languages as L

    rs = L.rust_sentinel("fn main() {\n    assert!(true);\n}\n", "/w/.done", "n0")
    assert "fn sc_eval_tests_main()" in rs and rs.count("fn main()") == 1 and 'std::fs::write("/w/.done", "n0")' in rs
    lua = L.lua_sentinel("lu = require('luaunit')\nos.exit(lu.LuaUnit.run())", "/w/.done", "n1")
    assert "os.exit(lu.LuaUnit.run())" not in lua and "if sc_eval_rc == 0 then" in lua and '"n1"' in lua
    assert L.lua_sentinel("print(1)", "/w", "n").rstrip().endswith("end")
    php = L.php_sentinel("<?php\necho 1;\n?>\n", "/w/.done", "n2")
    assert "?>\n\n<?php\n" in php and "file_put_contents('/w/.done', 'n2');" in php
    java = L.java_sentinel("import java.util.*;\nclass Problem {\n}\n", "/w/.done", "n3")
    assert "Problem.main(args);" in java and "class ScEvalMain" in java
    go = L.go_sentinel_file("package add_test\n\nimport (\n", "/w/.done", "n4")
    assert go[L.GO_SENTINEL_FILE].startswith("package add_test\n") and "func TestMain(m *testing.M)" in \
        go[L.GO_SENTINEL_FILE]


# ----------------------------------------------------------------------------- toolchains and data


def test_every_language_is_registered_under_multipl_e_tags():
    for tag, lang in {"cpp": "cpp", "java": "java", "go_test.go": "go", "rs": "rust", "php": "php",
                      "lua": "lua", "ts": "typescript", "py": "python", "js": "javascript"}.items():
        assert ex.get_executor(tag).language == lang


def test_missing_toolchain_names_the_package(tmp_path):
    base = ex.get_executor("rust")
    ghost = ex.register_executor(
        ex.Executor("test-rust-ghost", ".rs", ("{dir}/program",), compile=("sc-eval-no-rustc", "{file}"),
                    install=base.install), replace=True)
    with pytest.raises(ex.ExecutorUnavailableError, match="'sc-eval-no-rustc' not found.*install Debian's rustc"):
        ghost.resolve()
    res = ex.run_program("fn main() {}\n", "test-rust-ghost", config=CONFIG)
    assert res.status == "error" and "install Debian's rustc" in res.error
    lib = ex.Library("javatuples", (str(tmp_path / "none.jar"),), "Debian's libjavatuples-java")
    nolib = ex.register_executor(ex.Executor("test-java-ghost", ".java", ("/bin/true",), libraries=(lib,)),
                                 replace=True)
    with pytest.raises(ex.ExecutorUnavailableError, match="javatuples not found.*install Debian's libjavatuples-java"):
        nolib.resolve()


def test_parquet_rows_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(fixture_path("lua"), encoding="utf-8")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "humaneval-lua.parquet")
    from_parquet = he.load_multipl_e(str(tmp_path / "humaneval-lua.parquet"))
    from_jsonl = he.load_multipl_e(fixture_path("lua"))
    assert [(p.name, p.prompt, p.tests, p.stop_tokens, p.language) for p in from_parquet] == \
        [(p.name, p.prompt, p.tests, p.stop_tokens, p.language) for p in from_jsonl]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(he.DataError, match="bad.parquet: cannot read as parquet"):
        he.load_multipl_e(str(tmp_path / "bad.parquet"))


def test_several_files_names_and_languages():
    paths = [fixture_path("php"), fixture_path("lua")]
    probs = he.load_multipl_e_files(paths)
    assert {p.name for p in probs} >= {"php/HumanEval_53_add", "lua/HumanEval_53_add"}
    only = he.load_multipl_e_files(paths, languages=["lua"])
    assert [p.name for p in only] == ["HumanEval_53_add", "HumanEval_3_below_zero", "sandbox_add"]
    with pytest.raises(he.DataError, match="no problems in 'rs'"):
        he.load_multipl_e_files(paths, languages=["lua", "rs"])
    with pytest.raises(he.DataError, match="given twice"):
        he.load_multipl_e_files([fixture_path("php"), fixture_path("php")])


# ----------------------------------------------------------------------------- the two stages


def test_each_stage_gets_its_own_limits():
    """The compile stage runs under SandboxConfig.compile_* (at least the program's), the run stage
    under the program's limits; both in the same work directory, as the same user."""
    probe = "ulimit -v; ulimit -u; id -u; pwd"
    ex.register_executor(ex.Executor("test-two-stage", ".sh", ("/bin/bash", "-c", probe + "; cat {dir}/built"),
                                     compile=("/bin/bash", "-c", f"({probe}) > {{dir}}/built")), replace=True)
    config = SandboxConfig(timeout=10.0, memory_mb=300, max_processes=40, compile_memory_mb=900,
                           compile_max_processes=200)
    res = ex.run_program("", "test-two-stage", config=config)
    assert res.status == "passed" and res.completed is None, res.stderr
    run_av, run_np, run_uid, run_dir, compile_av, compile_np, compile_uid, compile_dir = res.stdout.split()
    assert (int(run_av), int(compile_av)) == (300 * 1024, 900 * 1024)
    assert (run_uid, run_dir) == (compile_uid, compile_dir)
    if CAPS["unprivileged_user"] and CAPS["root"]:
        assert (int(run_np), int(compile_np)) == (40, 200)


def test_compile_stage_timeout_and_failure():
    ex.register_executor(ex.Executor("test-slow-compiler", ".x", ("/bin/true",),
                                     compile=("/bin/sh", "-c", "sleep 30 & sleep 30")), replace=True)
    res = ex.run_program("", "test-slow-compiler", config=SandboxConfig(compile_timeout=1.0))
    assert res.status == "timeout" and res.stage == "compile" and res.wall_time < 10
    assert ex.describe_failure(res) == "timed out while compiling"
    _nothing_left(res)
    ex.register_executor(ex.Executor("test-bad-compiler", ".x", ("/bin/true",),
                                     compile=("/bin/sh", "-c", "echo 'x.c:1:2: error: nope' >&2; exit 1")),
                         replace=True)
    res = ex.run_program("", "test-bad-compiler", config=CONFIG)
    assert res.status == "compile_error" and ex.describe_failure(res) == "compile error: x.c:1:2: error: nope"
