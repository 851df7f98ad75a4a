"""Sandbox launcher: sets up the isolation, then forks and execs the untrusted program.

Run as ``python -I -S _launcher.py CONFIG_JSON`` by :mod:`sc_jax.eval.execution`
(standard library only, no imports from the package: it must start fast and must
not depend on the working directory). ``execution`` starts it in a new session
(``start_new_session=True``), so the launcher's pid is also the process-group id.

Order of operations (each step best effort; what worked is reported):

1. new network namespace (``CLONE_NEWNET``; unprivileged: ``CLONE_NEWUSER|CLONE_NEWNET``),
   loopback stays down, so even 127.0.0.1 is unreachable;
2. new mount namespace (root only): mounts made private; directories on the way to
   the interpreter that the sandbox user could not traverse (e.g. ``/root`` 0700 with
   pyenv inside) are covered by a read-only tmpfs that exposes only the interpreter
   prefix, read-only; world-writable directories (``/tmp``, ``/var/tmp``, ``/dev/shm``
   ...) become read-only; the program's work directory is bind-mounted read-write;
3. new pid namespace (``CLONE_NEWPID``): the forked child is pid 1 of it, so when the
   program exits or is killed the kernel kills (and reaps) everything it started;
4. in the child: fresh ``/proc``, rlimits, ``setgroups([])``/``setgid``/``setuid`` to the
   unprivileged id, parent-death signal, default SIGPIPE/SIGXFSZ, chdir, execve.

The launcher parent writes one JSON line ``{"stage": "ready", ...}`` with the flags and
the child's pid to the status fd and waits for the child; it exits with the child's
exit code or re-raises the child's fatal signal. A child that cannot exec writes
``{"stage": "exec_error", ...}`` and exits 127.
"""

import ctypes
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

RLIMITS = {
    "AS": resource.RLIMIT_AS,
    "DATA": resource.RLIMIT_DATA,
    "NPROC": resource.RLIMIT_NPROC,
    "FSIZE": resource.RLIMIT_FSIZE,
    "NOFILE": resource.RLIMIT_NOFILE,
    "CORE": resource.RLIMIT_CORE,
    "CPU": resource.RLIMIT_CPU,
}


def _enc(s):
    return None if s is None else os.fsencode(s)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags, what):
    _check(_libc.unshare(flags), what)


def _mount(source, target, fstype, flags, data=None):
    _check(
        _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)),
        f"mount {source or ''} -> {target}",
    )


def _write(fd, obj):
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    except OSError:
        pass


def _others_can_traverse(path):
    st = os.stat(path)
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_IXOTH)


def _blocked_ancestor(path):
    """The topmost directory strictly above `path` that 'other' users cannot traverse."""
    parts = path.strip("/").split("/")
    cur = ""
    for part in parts[:-1]:
        cur = cur + "/" + part
        if not _others_can_traverse(cur):
            return cur
    return None


def _setup_mounts(cfg, notes):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)

    # 1. expose the interpreter (and friends) hidden behind e.g. /root (0700)
    exposes = sorted({os.path.realpath(p) for p in cfg.get("expose", []) if os.path.exists(p)})
    exposes = [p for p in exposes if not any(p != q and p.startswith(q + "/") for q in exposes)]
    blocked = {}
    for p in exposes:
        a = _blocked_ancestor(p)
        if a is not None:
            blocked.setdefault(a, []).append(p)
    if blocked:
        tops = sorted(blocked)
        tops = [a for a in tops if not any(a != b and a.startswith(b + "/") for b in tops)]
        fds = {p: os.open(p, os.O_PATH) for ps in blocked.values() for p in ps}
        for a in tops:
            _mount("tmpfs", a, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for p, fd in fds.items():
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                open(p, "a").close()
            _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            _mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
        for a in tops:
            _mount(None, a, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        notes.append("exposed read-only: " + ", ".join(p for ps in blocked.values() for p in ps))

    # 2. world-writable directories read-only
    for d in cfg.get("readonly", []):
        if os.path.isdir(d) and not os.path.islink(d):
            _mount(d, d, None, MS_BIND | MS_REC)
            _mount(None, d, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

    # 3. the work directory stays writable
    w = cfg["workdir"]
    _mount(w, w, None, MS_BIND | MS_REC)
    _mount(None, w, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)


def _child(cfg, info, fd):
    stage = "child_setup_error"
    try:
        if info["pidns"] and info["mnt"]:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass  # the host /proc stays visible; not fatal
        for name, value in cfg.get("rlimits", {}).items():
            if value is None:
                continue
            lim = RLIMITS[name]
            _soft, hard = resource.getrlimit(lim)
            value = int(value)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(lim, (value, value))
        uid = cfg.get("uid")
        if uid is not None and os.geteuid() == 0:
            gid = cfg.get("gid", uid)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(cfg["workdir"])
        stage = "exec_error"
        argv = cfg["argv"]
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, then die
        _write(fd, {"stage": stage, "error": f"{type(e).__name__}: {e}"})
    os._exit(127)


def main():
    cfg = json.loads(sys.argv[1])
    fd = int(cfg["status_fd"])
    os.set_inheritable(fd, False)  # closes on exec: EOF tells the harness the program started
    root = os.geteuid() == 0
    info = {"stage": "ready", "net": False, "mnt": False, "pidns": False, "userns": False,
            "uid": None, "notes": []}
    notes = info["notes"]
    try:
        if cfg.get("net"):
            try:
                if root:
                    _unshare(CLONE_NEWNET, "unshare(CLONE_NEWNET)")
                else:
                    _unshare(CLONE_NEWUSER | CLONE_NEWNET, "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
                    info["userns"] = True
                info["net"] = True
            except OSError as e:
                notes.append(f"no network namespace ({e})")
        if cfg.get("fs") and root:
            try:
                _unshare(CLONE_NEWNS, "unshare(CLONE_NEWNS)")
            except OSError as e:
                notes.append(f"no mount namespace ({e})")
            else:
                try:
                    _setup_mounts(cfg, notes)
                    info["mnt"] = True
                except OSError as e:
                    _write(fd, {"stage": "setup_error", "error": f"mount setup failed: {e}"})
                    os._exit(126)
        if cfg.get("pidns") and (root or info["userns"]):
            try:
                _unshare(CLONE_NEWPID, "unshare(CLONE_NEWPID)")
                info["pidns"] = True
            except OSError as e:
                notes.append(f"no pid namespace ({e})")
        if cfg.get("uid") is not None and root:
            info["uid"] = cfg["uid"]
    except BaseException as e:  # noqa: BLE001
        _write(fd, {"stage": "setup_error", "error": f"{type(e).__name__}: {e}"})
        os._exit(126)

    pid = os.fork()
    if pid == 0:
        _child(cfg, info, fd)
    info["child"] = pid
    _write(fd, info)
    os.close(fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only SIGKILL (from the harness) ends us early
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    os._exit(128 + sig)


if __name__ == "__main__":
    main()
