"""Run untrusted programs (model completions) in a sandbox and report what happened.

One program = one temporary directory + one launcher process (``_launcher.py``) in its
own session/process group. On Linux as root the program runs

* in a new network namespace (no interfaces up: not even 127.0.0.1 answers),
* in a new mount namespace where ``/tmp``, ``/var/tmp``, ``/dev/shm``... are read-only and
  only its own directory is writable,
* in a new pid namespace (it is pid 1 there: when it ends, everything it started dies),
* as a fresh unprivileged uid/gid (one per run, so RLIMIT_NPROC counts only its own
  processes and it cannot signal other sandboxes),
* under rlimits: address space (or data segment for node), processes, file size,
  open files, core dumps off, CPU seconds as a backstop,
* with a wall-clock timeout after which the whole tree is SIGKILLed.

Whatever is unavailable (not root, no namespaces) is skipped and reported in
``ExecResult.isolation`` / :func:`sandbox_capabilities`, never fatal.

Executors are pluggable::

    register_executor(Executor("ruby", ".rb", ("ruby", "{file}")))

Placeholders in ``command``: ``{file}`` (absolute program path), ``{dir}`` (work
directory), ``{memory_mb}`` (the memory limit in MiB), ``{heap_mb}`` (half of it).

Pass = the program ran to its end. Exit code 0 alone does not prove that: a completion
that calls ``sys.exit(0)``, ``os._exit(0)`` or ``process.exit(0)`` before the tests ends
with 0 too. So after the program's last line (the tests) the harness appends the
executor's *sentinel*: a step that writes a random nonce, drawn per execution
(``secrets.token_hex(16)``), to a file in the work directory. ``passed`` needs exit code
0 **and** that file holding that nonce. The nonce is in the program text, so a
completion that reads its own source could forge it: the sentinel stops programs that
exit early, not code that sets out to fool the harness. Executors without a sentinel
(``sentinel=None``) fall back to exit code 0 alone (``ExecResult.completed`` is None).
"""

from __future__ import annotations

import dataclasses
import hmac
import importlib
import itertools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launcher.py")

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"
#: the compile stage (g++, javac, rustc, go test -c, tsc, php -l, luac -p) rejected the program:
#: MultiPL-E's "SyntaxError"
COMPILE_ERROR = "compile_error"
STATUSES = (PASSED, FAILED, TIMEOUT, ERROR, COMPILE_ERROR)

#: PATH inside the sandbox; executables are looked up here first, so the compiler the harness
#: checks is the one the program's own tools (rustc -> cc, tsc -> node) find too
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

#: directories every user may write to on a usual Linux box; read-only inside the sandbox
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")

#: the file in the work directory that the sentinel writes the run's nonce to
SENTINEL_FILE = ".sc_eval_done"

# The sentinels: appended after the tests, so they run only when the tests ran to their end.
# `{path}` and `{nonce}` become JSON string literals (valid in Python and JavaScript). Python
# uses an `import` statement (it ignores a module-level `__import__`/`open` the completion
# may have rebound) and writes with os.open/os.write, which no redirected sys.stdout affects.
PYTHON_SENTINEL = (
    "\n"
    "# sc_jax.eval sentinel: reached only when everything above ran to its end\n"
    "import os as _sc_eval_os\n"
    "_sc_eval_fd = _sc_eval_os.open({path}, _sc_eval_os.O_WRONLY | _sc_eval_os.O_CREAT | _sc_eval_os.O_TRUNC, 0o600)\n"
    "_sc_eval_os.write(_sc_eval_fd, {nonce}.encode())\n"
    "_sc_eval_os.close(_sc_eval_fd)\n"
)
JAVASCRIPT_SENTINEL = (
    "\n"
    ";// sc_jax.eval sentinel: reached only when everything above ran to its end\n"
    "require(\"fs\").writeFileSync({path}, {nonce});\n"
)


class EvalError(Exception):
    """A problem the user can fix (bad input, missing tool); the CLI prints it on one line."""


class UnknownLanguageError(EvalError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ExecutorUnavailableError(EvalError):
    pass


@dataclasses.dataclass(frozen=True)
class Library:
    """A file a language's tests need besides its toolchain (luaunit, javatuples): the first of
    `candidates` that exists is used; ``{name}`` in an executor's commands is its path."""

    name: str
    candidates: tuple[str, ...]
    install: str  # how to get it, named in the error when none exists

    def find(self) -> str | None:
        for path in self.candidates:
            path = os.path.expandvars(os.path.expanduser(path))
            if "$" not in path and os.path.isfile(path):
                return path
        return None


#: A sentinel given as a function: (source, sentinel path, nonce) -> the program text to write.
SentinelFn = Callable[[str, str, str], str]
#: Files written beside the program: (source, sentinel path, nonce) -> {file name: text}.
ExtraFilesFn = Callable[[str, str, str], dict[str, str]]


# ----------------------------------------------------------------------------- executors


@dataclasses.dataclass(frozen=True)
class Executor:
    """How to run a program of one language.

    Attributes:
        language: canonical name (``python``, ``javascript``...).
        suffix: file suffix of the program file (``.py``).
        command: argv with placeholders ``{file}``, ``{dir}``, ``{memory_mb}``; the first
            element is looked up on PATH when not absolute.
        memory_rlimit: which rlimit carries the memory limit: ``"AS"`` (address space),
            ``"DATA"`` (data segment: for runtimes that reserve huge virtual ranges, e.g.
            V8) or ``"none"``.
        aliases: other names (MultiPL-E uses ``py``, ``js``...).
        env: extra environment variables.
        expose: host paths the program needs to read although they sit behind a
            directory the sandbox user cannot traverse (made visible read-only).
        filename: fixed file name (e.g. ``Main.java``) instead of ``program{suffix}``.
        sentinel: code appended after the program that writes ``{nonce}`` to ``{path}``
            (both given as double-quoted string literals), or a function (source, path,
            nonce) -> program text for languages where appending is not enough (C++'s and
            Rust's ``main`` is renamed and wrapped); None: pass = exit code 0 alone.
        compile: argv of a compile stage run before ``command`` in the same sandbox and work
            directory (its limits: ``SandboxConfig.compile_*``); a non-zero exit is
            ``compile_error``. ``{dir}/...`` in ``command`` names what it built.
        compile_memory_rlimit: like ``memory_rlimit``, for the compile stage.
        prepare: (workdir, tmpdir) -> None, run by the harness before the sandbox user gets the
            directory (Go copies in a build cache warmed once per process).
        extra_files: (source, path, nonce) -> {name: text} written beside the program (Go's
            sentinel is a ``TestMain`` in a second ``_test.go`` file).
        requires: further executables the stages run (rustc links with ``cc``).
        libraries: files the tests need (luaunit, javatuples); ``{name}`` in the commands.
        install: how to install the toolchain, named when an executable is missing.
    """

    language: str
    suffix: str
    command: tuple[str, ...]
    memory_rlimit: str = "AS"
    aliases: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    expose: tuple[str, ...] = ()
    filename: str | None = None
    sentinel: str | SentinelFn | None = None
    compile: tuple[str, ...] | None = None
    compile_memory_rlimit: str = "AS"
    extra_files: ExtraFilesFn | None = None
    prepare: Callable[[str, str], None] | None = None
    requires: tuple[str, ...] = ()
    libraries: tuple[Library, ...] = ()
    install: str = ""

    def __post_init__(self):
        for rlimit in (self.memory_rlimit, self.compile_memory_rlimit):
            if rlimit not in ("AS", "DATA", "none"):
                raise ValueError(f"memory_rlimit must be AS, DATA or none, not {rlimit!r}")
        if not self.command or self.compile == ():
            raise ValueError("command (and compile, when given) must not be empty")

    def program_name(self) -> str:
        return self.filename or f"program{self.suffix}"

    def with_sentinel(self, source: str, path: str, nonce: str) -> str:
        """`source` followed by the sentinel step (unchanged when there is none)."""
        if self.sentinel is None:
            return source
        if callable(self.sentinel):
            return self.sentinel(source, path, nonce)
        return source + self.sentinel.format(path=json.dumps(path), nonce=json.dumps(nonce))

    @property
    def has_sentinel(self) -> bool:
        """Whether a pass needs the nonce (the sentinel is in the program or a file beside it)."""
        return self.sentinel is not None or self.extra_files is not None

    def stages(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(stage name, argv template, memory rlimit) in the order they run."""
        run = ("run", self.command, self.memory_rlimit)
        return [("compile", self.compile, self.compile_memory_rlimit), run] if self.compile else [run]

    def _tools(self) -> list[str]:
        """Executables to find before a run: each stage's (except one the compile stage builds)."""
        exes = [argv[0] for _, argv, _ in self.stages() if "{" not in argv[0]]
        return list(dict.fromkeys(exes + list(self.requires)))

    def _missing(self, what: str) -> ExecutorUnavailableError:
        how = f"install {self.install}" if self.install else "install it"
        return ExecutorUnavailableError(f"{self.language}: {what} (needed to run {self.language} programs): "
                                        f"{how}, or put it on PATH")

    def resolve(self) -> str:
        """Absolute path of the first stage's executable, after checking that every executable
        and library the stages need is there; raises ExecutorUnavailableError naming the package."""
        tools = self._tools()
        found = [find_executable(exe) for exe in tools]
        for exe, path in zip(tools, found):
            if path is None:
                raise self._missing(f"executable {exe!r} not found")
        for lib in self.libraries:
            if lib.find() is None:
                raise ExecutorUnavailableError(
                    f"{self.language}: {lib.name} not found (looked for {', '.join(lib.candidates)}; the tests of "
                    f"{self.language} programs need it): install {lib.install}")
        return found[0]

    def available(self) -> bool:
        try:
            self.resolve()
            return True
        except ExecutorUnavailableError:
            return False

    def argv(self, file: str, workdir: str, memory_mb: int, template: tuple[str, ...] | None = None) -> list[str]:
        """`template` (default: the run command) with its placeholders filled in, argv[0] absolute."""
        template = template or self.command
        # {heap_mb}: half the limit, for runtimes whose heap is one part of the memory they map (the JVM)
        subst = {"file": file, "dir": workdir, "memory_mb": str(memory_mb), "heap_mb": str(max(16, memory_mb // 2))}
        subst.update({lib.name: lib.find() or lib.name for lib in self.libraries})
        argv = [part.format(**subst) for part in template]
        if "{" not in template[0]:
            argv[0] = find_executable(template[0]) or argv[0]
        return argv


def find_executable(exe: str) -> str | None:
    """`exe` if absolute and executable, else the first on the sandbox's PATH, then the caller's."""
    if os.path.isabs(exe):
        return exe if os.access(exe, os.X_OK) else None
    return shutil.which(exe, path=SANDBOX_PATH) or shutil.which(exe)


_REGISTRY: dict[str, Executor] = {}
_ALIASES: dict[str, str] = {}
_REGISTRY_LOCK = threading.Lock()


def register_executor(executor: Executor, *, replace: bool = False) -> Executor:
    """Adds a language. Names and aliases are case-insensitive."""
    with _REGISTRY_LOCK:
        names = [executor.language, *executor.aliases]
        for name in names:
            key = name.lower()
            owner = _ALIASES.get(key)
            if owner is not None and owner != executor.language and not replace:
                raise ValueError(f"language name {name!r} is already used by {owner!r}")
        if executor.language in _REGISTRY and not replace:
            raise ValueError(f"executor {executor.language!r} already registered (pass replace=True)")
        _REGISTRY[executor.language] = executor
        for name in names:
            _ALIASES[name.lower()] = executor.language
    return executor


def get_executor(language: str) -> Executor:
    key = _ALIASES.get(str(language).lower())
    if key is None:
        raise UnknownLanguageError(
            f"unknown language {language!r} (known: {', '.join(sorted(_ALIASES))})"
        )
    return _REGISTRY[key]


register_executor(
    Executor(
        "python",
        ".py",
        (sys.executable, "-I", "{file}"),
        memory_rlimit="AS",
        aliases=("py", "python3"),
        expose=tuple(dict.fromkeys([sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))])),
        sentinel=PYTHON_SENTINEL,
    )
)
register_executor(
    Executor(
        "javascript",
        ".js",
        # V8 reserves far more address space than it uses: cap the heap and the data segment.
        ("node", "--max-old-space-size={memory_mb}", "--stack-size=4000", "{file}"),
        memory_rlimit="DATA",
        aliases=("js", "node", "nodejs"),
        sentinel=JAVASCRIPT_SENTINEL,
        install="Debian's nodejs",
    )
)


# ----------------------------------------------------------------------------- config/result


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for one run. Defaults follow MultiPL-E (15 s wall timeout)."""

    timeout: float = 15.0
    memory_mb: int = 2048
    max_processes: int = 64  # RLIMIT_NPROC: counts threads of the sandbox uid
    max_file_mb: int = 64
    max_open_files: int = 512
    max_output_bytes: int = 32 * 1024  # tail kept per stream
    isolate_network: bool = True
    isolate_filesystem: bool = True
    isolate_pids: bool = True
    user: str | int | None = "auto"  # "auto": fresh uid per run when root; "nobody"; an int; None: stay
    tmp_root: str | None = None  # where the per-run directories go (default: the system temp dir)
    # The compile stage (executors with `compile`) runs the same sandbox with its own limits: a
    # compiler needs more time, memory and threads (javac, rustc, go's parallel build) than a test
    # program; each limit is at least the program's. `timeout` covers the program alone.
    compile_timeout: float = 60.0
    compile_memory_mb: int = 4096
    compile_max_processes: int = 512

    def replace(self, **kw) -> SandboxConfig:
        return dataclasses.replace(self, **kw)

    def for_stage(self, stage: str) -> SandboxConfig:
        """The limits of one stage: "run" (these) or "compile"."""
        if stage != "compile":
            return self
        return self.replace(timeout=self.compile_timeout, memory_mb=max(self.memory_mb, self.compile_memory_mb),
                            max_processes=max(self.max_processes, self.compile_max_processes))


@dataclasses.dataclass
class ExecResult:
    status: str  # passed / failed / timeout / error
    exit_code: int | None  # negative: killed by that signal
    stdout: str  # tail
    stderr: str  # tail
    wall_time: float
    language: str = "python"
    error: str | None = None  # harness-side problem (status "error")
    isolation: dict[str, Any] = dataclasses.field(default_factory=dict)
    pid: int | None = None  # the launcher's pid = the process-group id (all killed on return)
    completed: bool | None = None  # the sentinel ran (None: the executor has no sentinel)
    stage: str = "run"  # the stage the verdict comes from: "compile" (compile_error, or its timeout) or "run"

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Program:
    source: str
    language: str = "python"
    timeout: float | None = None  # overrides the config's
    tag: Any = None


# ----------------------------------------------------------------------------- helpers

_UID_LOCK = threading.Lock()
_UID_COUNTER = itertools.count()
_UID_BASE = 0x100000  # 1,048,576: far above any real account
_UID_SPAN = 4096


def _fresh_uid() -> int:
    """A uid no account uses, distinct per run (per harness process, cycling every 4096)."""
    with _UID_LOCK:
        n = next(_UID_COUNTER)
    return _UID_BASE + ((os.getpid() % 4096) * _UID_SPAN) + (n % _UID_SPAN)


def _resolve_user(user) -> int | None:
    if os.geteuid() != 0 or user is None:
        return None
    if user == "auto":
        return _fresh_uid()
    if user == "nobody":
        return 65534
    if isinstance(user, int) or (isinstance(user, str) and user.isdigit()):
        return int(user)
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise EvalError(f"unknown sandbox user {user!r}") from None


def _others_can_traverse(path: str) -> bool:
    cur = "/"
    for part in os.path.realpath(path).strip("/").split("/"):
        try:
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        cur = os.path.join(cur, part)
    return True


def _tmp_root(config: SandboxConfig, unprivileged: bool) -> str:
    root = config.tmp_root or tempfile.gettempdir()
    if unprivileged and not _others_can_traverse(os.path.join(root, "x")):
        root = "/tmp"
    os.makedirs(root, exist_ok=True)
    return root


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_pid(pid: int | None, pidfd: int | None) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        elif pid is not None:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of_uid(uid: int, *, include_zombies: bool = False) -> list[int]:
    """Pids whose real uid is `uid` (reads /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                text = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            ruid = int(fields["Uid"].split()[0])
        except (KeyError, ValueError, IndexError):
            continue
        if ruid != uid:
            continue
        if not include_zombies and fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        pids.append(int(name))
    return pids


def _sweep_uid(uid: int, rounds: int = 20) -> None:
    """SIGKILLs everything running as `uid` (only used for per-run uids)."""
    for _ in range(rounds):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


_EXIT = object()  # selector tag of the launcher's pidfd


class _Tail:
    def __init__(self, limit: int):
        self.limit = limit
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        data = bytes(self.buf[-self.limit :]) if self.limit else b""
        prefix = f"[... {self.total - len(data)} bytes dropped ...]\n" if self.total > len(data) else ""
        return prefix + data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- capabilities

_CAPS: dict[str, Any] | None = None
_CAPS_LOCK = threading.Lock()


def sandbox_capabilities(refresh: bool = False) -> dict[str, Any]:
    """What isolation this machine gives, found by running a trivial program once.

    Keys: ``root``, ``network`` (network namespace), ``filesystem`` (mount namespace with
    read-only shared temp dirs), ``pids`` (pid namespace), ``unprivileged_user`` (drops to
    a fresh uid), ``notes``.
    """
    global _CAPS
    with _CAPS_LOCK:
        if _CAPS is not None and not refresh:
            return dict(_CAPS)
        caps: dict[str, Any] = {"root": os.geteuid() == 0, "notes": []}
        cfg = SandboxConfig(timeout=30.0)
        res = _run_one(get_executor("python"), "pass\n", cfg)
        if res.status == ERROR and "mount" in (res.error or ""):
            caps["notes"].append(f"mount isolation failed, disabled: {res.error}")
            caps["filesystem_broken"] = True
            res = _run_one(get_executor("python"), "pass\n", cfg.replace(isolate_filesystem=False))
        iso = res.isolation
        caps.update(
            network=bool(iso.get("network")),
            filesystem=bool(iso.get("filesystem")),
            pids=bool(iso.get("pids")),
            unprivileged_user=iso.get("uid") is not None or not caps["root"],
            probe_status=res.status,
        )
        caps["notes"] += list(iso.get("notes", []))
        if res.status != PASSED:
            caps["notes"].append(f"probe program did not pass: {res.error or res.stderr.strip()[-300:]}")
        _CAPS = caps
        return dict(caps)


def describe_capabilities(caps: dict[str, Any] | None = None) -> str:
    caps = caps or sandbox_capabilities()
    yn = lambda b: "yes" if b else "NO"  # noqa: E731
    return (
        f"sandbox: network-namespace={yn(caps['network'])} mount-namespace={yn(caps['filesystem'])} "
        f"pid-namespace={yn(caps['pids'])} unprivileged-user={yn(caps['unprivileged_user'])}"
    )


# ----------------------------------------------------------------------------- running


def run_program(
    source: str,
    language: str = "python",
    *,
    timeout: float | None = None,
    config: SandboxConfig | None = None,
) -> ExecResult:
    """Runs one program in the sandbox. Never raises for program behaviour."""
    config = config or SandboxConfig()
    if timeout is not None:
        config = config.replace(timeout=timeout)
    executor = get_executor(language)
    if config.isolate_filesystem and os.geteuid() == 0 and not sandbox_capabilities()["filesystem"]:
        config = config.replace(isolate_filesystem=False)  # mount namespace unavailable here
    return _run_one(executor, source, config)


def _run_one(executor: Executor, source: str, config: SandboxConfig) -> ExecResult:
    """One run: the user and the work directory, the launcher and its pipes until it exits or
    times out, then every process of the run killed, and the verdict."""
    t0 = time.monotonic()
    try:
        exe = executor.resolve()
    except ExecutorUnavailableError as e:
        return _harness_error(executor, t0, str(e))
    uid, per_run_uid = _sandbox_user(config, exe)
    workdir = tempfile.mkdtemp(prefix="sc_eval_", dir=_tmp_root(config, uid is not None))
    try:
        files = _write_program(executor, source, workdir, uid)
        for stage, template, memory_rlimit in executor.stages():
            stage_config = config.for_stage(stage)
            launch_config = _launcher_config(executor, stage_config, files, template, memory_rlimit, uid)
            try:
                run = _Launch.start(launch_config, config.max_output_bytes)
            except OSError as e:
                return _harness_error(executor, t0, f"could not start the launcher: {e}")
            with run:
                timed_out = run.watch(deadline=time.monotonic() + stage_config.timeout)
                run.stop(timed_out, sweep_uid=uid if per_run_uid else None)
                res = _classify(executor, files, run, timed_out, time.monotonic() - t0, stage)
            if stage == "run" or res.status != PASSED:
                return res
        raise AssertionError("unreachable: the last stage is the run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _harness_error(executor: Executor, t0: float, message: str) -> ExecResult:
    """A run that never got as far as the program (status "error")."""
    return ExecResult(ERROR, None, "", "", time.monotonic() - t0, executor.language, message, {})


def _sandbox_user(config: SandboxConfig, exe: str) -> tuple[int | None, bool]:
    """The uid the program runs as (None: ours), and whether it is a fresh one for this run only
    (then whatever still runs as it afterwards is ours to kill)."""
    uid = _resolve_user(config.user)
    if uid is not None and not (config.isolate_filesystem or _others_can_traverse(exe)):
        return None, False  # without a mount namespace the unprivileged user could not even start the interpreter
    return uid, config.user == "auto" and uid is not None


@dataclasses.dataclass(frozen=True)
class _ProgramFiles:
    workdir: str
    tmpdir: str  # the program's TMPDIR
    program: str
    sentinel: str  # where the sentinel writes the nonce
    nonce: str


def _write_program(executor: Executor, source: str, workdir: str, uid: int | None) -> _ProgramFiles:
    """The program (with its sentinel) and its TMPDIR in `workdir`, owned by the sandbox user."""
    tmpdir = os.path.join(workdir, "tmp")
    os.mkdir(tmpdir)
    files = _ProgramFiles(workdir, tmpdir, os.path.join(workdir, executor.program_name()),
                          os.path.join(workdir, SENTINEL_FILE),
                          secrets.token_hex(16))  # 128 bits, new for every run: nothing can guess it ahead
    texts = {files.program: executor.with_sentinel(source, files.sentinel, files.nonce)}
    if executor.extra_files is not None:
        for name, text in executor.extra_files(source, files.sentinel, files.nonce).items():
            texts[os.path.join(workdir, name)] = text
    for path, text in texts.items():
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if executor.prepare is not None:
        executor.prepare(workdir, tmpdir)
    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(workdir):
            for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
                os.chown(name, uid, uid, follow_symlinks=False)
    os.chmod(workdir, 0o700)
    return files


def _environment(executor: Executor, files: _ProgramFiles) -> dict[str, str]:
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": files.workdir,
        "TMPDIR": files.tmpdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
    # `{dir}` / `{tmp}` in an executor's variables: its work directory / TMPDIR (e.g. GOCACHE)
    env.update({k: v.replace("{dir}", files.workdir).replace("{tmp}", files.tmpdir) for k, v in executor.env})
    return env


def _rlimits(memory_rlimit: str, config: SandboxConfig, uid: int | None) -> dict[str, int | None]:
    rlimits = {
        "NPROC": config.max_processes if uid is not None else None,  # root ignores it anyway
        "FSIZE": config.max_file_mb * 2**20,
        "NOFILE": config.max_open_files,
        "CORE": 0,
        "CPU": int(config.timeout) + 5,  # backstop if the harness dies
    }
    memory_mb = int(config.memory_mb)
    if memory_rlimit != "none" and memory_mb > 0:
        rlimits[memory_rlimit] = memory_mb * 2**20
    return rlimits


def _launcher_config(executor: Executor, config: SandboxConfig, files: _ProgramFiles, template: tuple[str, ...],
                     memory_rlimit: str, uid: int | None) -> dict[str, Any]:
    """What `_launcher.py` sets up before it execs one stage (its status fd is added at start)."""
    argv = executor.argv(files.program, files.workdir, int(config.memory_mb), template)
    readonly = [d for d in WORLD_WRITABLE if os.path.isdir(d)]
    base = os.path.dirname(files.workdir)
    if base not in readonly and os.stat(base).st_mode & stat.S_IWOTH:
        readonly.append(base)
    return {
        "workdir": files.workdir,
        "argv": argv,
        "env": _environment(executor, files),
        "uid": uid,
        "gid": uid,
        "net": config.isolate_network,
        "fs": config.isolate_filesystem,
        "pidns": config.isolate_pids,
        "expose": list(executor.expose) + [os.path.dirname(os.path.realpath(argv[0]))],
        "readonly": readonly,
        "rlimits": _rlimits(memory_rlimit, config, uid),
    }


class _Launch:
    """The launcher process of one run and what we read from it: the tails of its stdout and
    stderr, its status lines (`info`: the "ready" record) and pidfds for it and its child (pid 1
    of the program's pid namespace). Closing it kills the process group if it still runs."""

    def __init__(self, proc: subprocess.Popen, status_r: int, max_output_bytes: int):
        self.proc = proc
        self.pgid = proc.pid  # started in a new session: its pid is the group id
        self.status_r = status_r
        self.pidfd = _pidfd(proc.pid)
        self.child_pidfd: int | None = None
        self.out, self.err = _Tail(max_output_bytes), _Tail(max_output_bytes)
        self.status = bytearray()
        self.info: dict[str, Any] = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ, self.out)
        self.sel.register(proc.stderr, selectors.EVENT_READ, self.err)
        self.sel.register(status_r, selectors.EVENT_READ, self.status)
        if self.pidfd is not None:
            self.sel.register(self.pidfd, selectors.EVENT_READ, _EXIT)

    @classmethod
    def start(cls, launch_config: dict[str, Any], max_output_bytes: int) -> _Launch:
        """Starts the launcher in its own session, its status pipe passed down; raises OSError."""
        status_r, status_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", LAUNCHER, json.dumps({"status_fd": status_w, **launch_config})],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=launch_config["env"],
                cwd=launch_config["workdir"],
                start_new_session=True,
                pass_fds=(status_w,),
                close_fds=True,
            )
        except OSError:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        return cls(proc, status_r, max_output_bytes)

    def exited(self) -> bool:
        # WNOWAIT: leave the zombie so the pgid cannot be reused before we kill the group
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def pump(self, wait: float) -> None:
        """Reads what the pipes have (waiting up to `wait` seconds); a closed pipe leaves the selector."""
        for key, _ in self.sel.select(timeout=max(0.0, wait)):
            if key.data is _EXIT:
                self.sel.unregister(key.fileobj)
                continue
            fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                self.sel.unregister(key.fileobj)
            elif key.data is self.status:
                self.status.extend(data)
            else:
                key.data.add(data)

    def watch(self, deadline: float) -> bool:
        """Reads the pipes until the launcher exits (False) or `deadline` passes (True)."""
        timed_out = False
        while True:
            now = time.monotonic()
            if self.exited():
                break
            if now >= deadline:
                timed_out = True
                break
            if not self.sel.get_map():
                time.sleep(min(0.01, deadline - now))
                continue
            self.pump(min(deadline - now, 0.25 if self.pidfd is None else deadline - now))
            if self.child_pidfd is None and self.status:
                self.info = _parse_status(self.status)
                if self.info.get("child"):
                    self.child_pidfd = _pidfd(int(self.info["child"]))
        self.info = _parse_status(self.status)
        return timed_out

    def stop(self, timed_out: bool, sweep_uid: int | None) -> None:
        """Kills every process of the run, then reads what is left in the pipes."""
        if timed_out:
            self._kill_namespace()
        _killpg(self.pgid)
        if sweep_uid is not None and not self.info.get("pidns"):
            _sweep_uid(sweep_uid)  # no pid namespace took its processes down with it
        drain_end = time.monotonic() + 1.0  # the writers are dead now
        while time.monotonic() < drain_end and any(k.data is not _EXIT for k in self.sel.get_map().values()):
            self.pump(0.05)
        self.sel.close()
        self.proc.wait()

    def _kill_namespace(self) -> None:
        # kill pid 1 of the pid namespace: the kernel tears the namespace down and the
        # launcher exits once it is gone (the caller then kills the whole group for good measure)
        child = self.info.get("child")
        if child:
            _kill_pid(int(child), self.child_pidfd)
            end = time.monotonic() + 5.0
            while time.monotonic() < end and not self.exited():
                self.pump(0.02)

    def __enter__(self) -> _Launch:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            _killpg(self.proc.pid)
            self.proc.wait()
        self.sel.close()
        for fd in (self.pidfd, self.child_pidfd, self.status_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _classify(executor: Executor, files: _ProgramFiles, run: _Launch, timed_out: bool, wall: float,
              stage: str = "run") -> ExecResult:
    """The verdict of a finished stage: a harness error when the launcher could not set up or exec
    it, else timeout / passed / failed (exit code and sentinel); a compile stage that exits non-zero
    is compile_error, one that exits 0 "passed" (the run stage follows)."""
    info = run.info
    isolation = {
        "network": bool(info.get("net")),
        "filesystem": bool(info.get("mnt")),
        "pids": bool(info.get("pidns")),
        "uid": info.get("uid"),
        "notes": info.get("notes", []),
    }
    code, out, err = run.proc.returncode, run.out.text(), run.err.text()
    stages = _parse_status(run.status, all_lines=True)
    setup_error = stages.get("setup_error") or stages.get("child_setup_error") or stages.get("exec_error")
    if setup_error:
        error = f"compile stage: {setup_error}" if stage == "compile" else setup_error
        return ExecResult(ERROR, code, out, err, wall, executor.language, error, isolation, run.pgid, stage=stage)
    if stage == "compile":
        status = TIMEOUT if timed_out else PASSED if code == 0 else COMPILE_ERROR
        return ExecResult(status, code, out, err, wall, executor.language, None, isolation, run.pgid, stage=stage)
    # read only now: every process of the run is dead, nothing can write the file any more
    completed = _sentinel_written(files.sentinel, files.nonce) if executor.has_sentinel else None
    status = _verdict(timed_out, code, completed)
    return ExecResult(status, code, out, err, wall, executor.language, None, isolation, run.pgid, completed)


def _verdict(timed_out: bool, exit_code: int | None, completed: bool | None) -> str:
    """passed = exit code 0 and (when the executor has a sentinel) the tests ran to their end."""
    if timed_out:
        return TIMEOUT
    if exit_code == 0 and completed is not False:
        return PASSED
    return FAILED


def _sentinel_written(path: str, nonce: str) -> bool:
    """Whether `path` is a regular file holding exactly `nonce`. The program owns the
    directory, so the name may be a symlink or a FIFO it made: never follow, never block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        data = os.read(fd, len(nonce) + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    return hmac.compare_digest(data, nonce.encode())


def describe_failure(res: ExecResult) -> str:
    """One line on why a run did not pass (for reports and `check-canonical`)."""
    if res.status == ERROR:
        return res.error or "harness error"
    if res.status == TIMEOUT:
        return "timed out while compiling" if res.stage == "compile" else "timed out"
    if res.exit_code == 0 and res.completed is False:
        return "exited with code 0 before the tests ran to their end"
    if res.status == COMPILE_ERROR:  # the first diagnostic (tsc and php -l write theirs to stdout)
        lines = [line.strip() for line in (res.stderr + "\n" + res.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        located = [line for line in lines if _DIAGNOSTIC.search(line)]  # file:line: message (go, luac)
        return "compile error: " + (errors or located or lines or [f"exit code {res.exit_code}"])[0]
    # the last line that says something: node ends its report with a "Node.js v20..." line
    lines = [line.strip() for line in res.stderr.splitlines() if line.strip() and not line.startswith("Node.js v")]
    errors = [line for line in lines if "Error" in line]
    return (errors or lines or [f"exit code {res.exit_code}"])[-1]


#: a compiler's diagnostic line: "program.go:12:5: ..." / "luac5.4: program.lua:8: ..."
_DIAGNOSTIC = re.compile(r"\.\w+:\d+:")


def _parse_status(buf: bytes | bytearray, all_lines: bool = False) -> dict[str, Any]:
    """The launcher's status lines: the `ready` record, or with all_lines a map stage -> error."""
    ready: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for line in bytes(buf).decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("stage") == "ready":
            ready = rec
        else:
            stages[rec.get("stage", "error")] = rec.get("error", "unknown launcher error")
    return stages if all_lines else ready


class ProgramPool:
    """Runs programs on worker threads as they are submitted (each program is its own
    process tree), so execution can overlap with generation. One progress bar on stderr
    counts finished programs, whenever they finish; `note` adds text to it (e.g. how
    many samples are generated so far).

        with ProgramPool(total=len(programs)) as pool:
            for key, program in ...:
                pool.submit(key, program)
            results = pool.wait()          # {key: ExecResult}
    """

    def __init__(self, *, total: int, workers: int | None = None, config: SandboxConfig | None = None,
                 progress: bool = True, desc: str = "execute",
                 on_result: Callable[[Any, ExecResult], None] | None = None):
        self.config = config or SandboxConfig()
        if workers is None:
            workers = max(1, min(8, os.cpu_count() or 1))
        self.on_result = on_result
        self.bar = _Progress(total, desc, enabled=progress)
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="sandbox")
        self._futures: dict[Any, Any] = {}
        self._probed = False
        self._callback_error: BaseException | None = None

    def submit(self, key, program: Program | str | tuple[str, str]) -> None:
        """Starts `program` as soon as a worker is free; raises for an unknown language."""
        p = _as_program(program)
        get_executor(p.language)
        if key in self._futures:
            raise ValueError(f"program key {key!r} submitted twice")
        if not self._probed and os.geteuid() == 0:
            sandbox_capabilities()  # probe once, before the threads race for it
        self._probed = True
        fut = self._pool.submit(run_program, p.source, p.language, timeout=p.timeout, config=self.config)
        fut.add_done_callback(lambda f, key=key: self._finished(key, f))
        self._futures[key] = fut

    def note(self, text: str) -> None:
        self.bar.note(text)

    def _finished(self, key, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # wait() raises it
        res = fut.result()
        self.bar.update(res)
        try:
            if self.on_result is not None:
                self.on_result(key, res)
        except BaseException as e:  # noqa: BLE001 - a worker thread: hand it to wait()
            self._callback_error = e

    def wait(self) -> dict[Any, ExecResult]:
        """Every submitted program's result, keyed as submitted (in submission order)."""
        results = {key: fut.result() for key, fut in self._futures.items()}
        if self._callback_error is not None:
            raise self._callback_error
        return results

    def __enter__(self) -> ProgramPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an error (or Ctrl-C) drop what has not started; running programs end by their timeout
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        self.bar.close()


def run_many(
    programs: Sequence[Program | str | tuple[str, str]],
    *,
    workers: int | None = None,
    config: SandboxConfig | None = None,
    progress: bool = True,
    desc: str = "execute",
    on_result: Callable[[int, ExecResult], None] | None = None,
) -> list[ExecResult]:
    """Runs programs concurrently (threads; each program is its own process tree).

    `programs` items: a Program, a Python source string, or ``(language, source)``.
    Results come back in input order. Progress goes to stderr.
    """
    progs = [_as_program(p) for p in programs]
    for p in progs:  # fail fast on an unknown language, before starting anything
        get_executor(p.language)
    with ProgramPool(total=len(progs), workers=workers, config=config, progress=progress, desc=desc,
                     on_result=on_result) as pool:
        for i, p in enumerate(progs):
            pool.submit(i, p)
        results = pool.wait()
    return [results[i] for i in range(len(progs))]


def _as_program(p) -> Program:
    if isinstance(p, Program):
        return p
    if isinstance(p, str):
        return Program(p)
    if isinstance(p, tuple) and len(p) == 2:
        return Program(p[1], p[0])
    raise TypeError(f"cannot run {type(p).__name__}: pass Program, a source string or (language, source)")


class _Progress:
    """A tqdm bar on stderr counting finished programs by status. Thread-safe: the pool's
    worker threads update it as their programs finish."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled and total > 0
        self.counts = {s: 0 for s in STATUSES}
        self.done = 0
        self.extra = ""
        self.bar = None
        self.lock = threading.Lock()
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

    def _postfix(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        return " ".join(t for t in (self.extra, counts) if t)

    def note(self, text: str) -> None:
        with self.lock:
            self.extra = text
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix())

    def update(self, res: ExecResult) -> None:
        with self.lock:
            self.done += 1
            self.counts[res.status] = self.counts.get(res.status, 0) + 1
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix(), refresh=False)
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def status_counts(results: Iterable[ExecResult]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


# The executors of MultiPL-E's other languages (C++, Java, Go, Rust, PHP, Lua, TypeScript) register
# themselves; imported last because they are built from the definitions above.
importlib.import_module("sc_jax.eval.languages")
