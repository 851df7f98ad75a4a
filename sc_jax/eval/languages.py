"""Executors for MultiPL-E's compiled and scripted languages beyond Python and JavaScript:
C++, Java, Go, Rust, PHP, Lua and TypeScript.

Each follows MultiPL-E's ``evaluation/src/eval_<lang>.py``: the same compiler and flags,
file layout and test library, and its rule for a pass (exit code 0 with no compile error).
A compiler's rejection is ``compile_error`` (MultiPL-E's "SyntaxError"). Compile and run
are two stages of one sandboxed run (same work directory, uid, namespaces and rlimits;
the compile stage's limits are ``SandboxConfig.compile_*``).

* cpp: ``g++ -std=c++17 -o program program.cpp``, then ``./program``
* java: ``javac -cp javatuples.jar -d . Problem.java``, then ``java -ea -cp .:javatuples.jar``
* go: ``go test -c program_test.go`` (vet on, as ``go test``), then ``./program.test -test.paniconexit0``
* rust: ``rustc program.rs -o program``, then ``./program``
* php: ``php -l program.php`` (syntax check), then ``php program.php``
* lua: ``luac5.4 -p program.lua`` (syntax check), then ``lua5.4 program.lua`` (luaunit)
* typescript: ``tsc --target esnext --skipLibCheck program.ts``, then ``node program.js``

The sentinel (a pass needs the tests to run to their end, see ``execution``) is placed per
language where "the end of the tests" is: after ``main`` in C++ and Rust (the tests' ``main``
is renamed and called from a new one), a class whose ``main`` calls ``Problem.main`` in Java,
a ``TestMain`` in a second ``_test.go`` file in Go, around luaunit's final
``os.exit(lu.LuaUnit.run())`` in Lua, and after the last line in PHP and TypeScript.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading

from sc_jax.eval.execution import Executor, Library, find_executable, register_executor

#: where Debian's libjavatuples-java and lua-unit put the test libraries MultiPL-E's prompts use
JAVATUPLES = Library("javatuples", ("$SC_EVAL_JAVATUPLES_JAR", "/usr/share/java/javatuples.jar"),
                     "Debian's libjavatuples-java (or set SC_EVAL_JAVATUPLES_JAR to javatuples-1.2.jar)")
LUAUNIT = Library("luaunit", ("/usr/share/lua/5.4/luaunit.lua", "/usr/local/share/lua/5.4/luaunit.lua"),
                  "Debian's lua-unit (luaunit for Lua 5.4)")


def _literal(text: str) -> str:
    """A double-quoted string literal valid in C++, Java, Go, Rust, Lua and TypeScript (the
    sentinel's path and nonce are ASCII: a temp directory and hex)."""
    return json.dumps(text)


# ----------------------------------------------------------------------------- C++


def _matching_brace(src: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at` in C-like source, skipping string and
    character literals and comments; None when unbalanced."""
    depth, i, n = 0, open_at, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            i = src.find("\n", i)
            i = n if i < 0 else i
        elif src.startswith("/*", i):
            i = src.find("*/", i + 2)
            i = n if i < 0 else i + 1
        elif c in "\"'":
            i += 1
            while i < n and src[i] != c:
                i += 2 if src[i] == "\\" else 1
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


CPP_MAIN = re.compile(r"\bint\s+main\s*\(\s*(void)?\s*\)\s*\{")
CPP_SENTINEL = """
// sc_jax.eval sentinel: the tests' main (renamed above) ran to its end
#include <cstdio>
int main() {{
    int sc_eval_rc = sc_eval_tests_main();
    if (sc_eval_rc == 0) {{
        std::FILE* sc_eval_f = std::fopen({path}, "w");
        if (sc_eval_f == nullptr) return 1;
        std::fputs({nonce}, sc_eval_f);
        std::fclose(sc_eval_f);
    }}
    return sc_eval_rc;
}}
"""


def cpp_sentinel(source: str, path: str, nonce: str) -> str:
    """Renames the tests' ``int main()`` (the last one) and ends its body with ``return 0;`` (only
    ``main`` returns 0 by falling off its end), then a new ``main`` calls it and writes the nonce.
    A program with no recognisable ``main`` is left as is: it cannot pass (no nonce)."""
    found = list(CPP_MAIN.finditer(source))
    close = _matching_brace(source, found[-1].end() - 1) if found else None
    if close is None:
        return source
    head = source[:found[-1].start()] + "int sc_eval_tests_main() {"
    body = source[found[-1].end():close]
    body += ("" if body.endswith("\n") else "\n") + "    return 0;\n"
    return head + body + source[close:] + CPP_SENTINEL.format(path=_literal(path), nonce=_literal(nonce))


# ----------------------------------------------------------------------------- Rust


RUST_MAIN = re.compile(r"\bfn\s+main\s*\(\s*\)")
RUST_SENTINEL = """
// sc_jax.eval sentinel: the tests' main (renamed above) returned
fn main() {{
    sc_eval_tests_main();
    std::fs::write({path}, {nonce}).expect("sc_jax.eval sentinel");
}}
"""


def rust_sentinel(source: str, path: str, nonce: str) -> str:
    """Renames the tests' ``fn main()`` (the last one) and calls it from a new ``main`` that
    writes the nonce once it returns (a panic exits 101 before)."""
    found = list(RUST_MAIN.finditer(source))
    if not found:
        return source
    m = found[-1]
    renamed = source[:m.start()] + "fn sc_eval_tests_main()" + source[m.end():]
    return renamed + RUST_SENTINEL.format(path=_literal(path), nonce=_literal(nonce))


# ----------------------------------------------------------------------------- Java

JAVA_CLASS = re.compile(r"^\s*(?:public\s+|final\s+)*class\s+(\w+)", re.MULTILINE)
#: the class the JVM starts: it runs the tests (``Problem.main``) and then writes the nonce, so
#: a completion that calls System.exit(0) ends before it
JAVA_MAIN_CLASS = "ScEvalMain"
JAVA_SENTINEL = """
// sc_jax.eval sentinel: {cls}.main (the tests) ran to its end
class ScEvalMain {{
    public static void main(String[] args) throws Throwable {{
        {cls}.main(args);
        java.nio.file.Files.writeString(java.nio.file.Path.of({path}), {nonce});
    }}
}}
"""


def java_sentinel(source: str, path: str, nonce: str) -> str:
    """Adds ScEvalMain, which calls the tests' class (MultiPL-E: ``class Problem``)."""
    m = JAVA_CLASS.search(source)
    cls = m.group(1) if m else "Problem"
    return source + JAVA_SENTINEL.format(cls=cls, path=_literal(path), nonce=_literal(nonce))


# ----------------------------------------------------------------------------- Go

GO_PACKAGE = re.compile(r"^\s*package\s+(\w+)", re.MULTILINE)
GO_SENTINEL_FILE = "sc_eval_main_test.go"
GO_SENTINEL = """package {package}

// sc_jax.eval sentinel: every test of the package ran and passed

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {{
	code := m.Run()
	if code == 0 {{
		if err := os.WriteFile({path}, []byte({nonce}), 0o600); err != nil {{
			os.Exit(1)
		}}
	}}
	os.Exit(code)
}}
"""


def go_sentinel_file(source: str, path: str, nonce: str) -> dict[str, str]:
    """A second test file of the program's package whose TestMain writes the nonce after the
    tests passed (``go test`` reports os.Exit(0) inside a test as a failure too)."""
    m = GO_PACKAGE.search(source)
    package = m.group(1) if m else "main"
    return {GO_SENTINEL_FILE: GO_SENTINEL.format(package=package, path=_literal(path), nonce=_literal(nonce))}


#: what every run's GOCACHE starts from: `go vet` (part of `go test`) otherwise re-analyses fmt,
#: testing and their dependencies in each fresh cache (about 5 s of the 6 s of a compile)
GO_WARM_IMPORTS = ("testing", "fmt", "math", "strings", "sort", "strconv", "unicode", "os")
_GO_CACHE: dict[str, str | None] = {}
_GO_CACHE_LOCK = threading.Lock()
GO_ENV = (("GOPROXY", "off"), ("GOTOOLCHAIN", "local"), ("GOTELEMETRY", "off"), ("GOFLAGS", ""))


def _go_cache_template() -> str | None:
    """A build cache made once per process by `go test -c` of a trusted test importing
    GO_WARM_IMPORTS, in the sandbox's Go environment; None when that fails (runs then start cold)."""
    with _GO_CACHE_LOCK:
        if "dir" in _GO_CACHE:
            return _GO_CACHE["dir"]
        root = tempfile.mkdtemp(prefix="sc_eval_gocache_")
        atexit.register(shutil.rmtree, root, True)
        src = os.path.join(root, "warm_test.go")
        uses = "\n".join(f"\t_ = {name}" for name in ("fmt.Sprint", "math.Abs", "strings.Split", "sort.Ints",
                                                     "strconv.Itoa", "unicode.IsUpper", "os.Exit"))
        with open(src, "w") as f:
            f.write("package warm_test\n\nimport (\n" + "".join(f'\t"{p}"\n' for p in GO_WARM_IMPORTS)
                    + ")\n\nfunc TestWarm(t *testing.T) {\n" + uses + "\n}\n")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": root, "GOCACHE": os.path.join(root, "go-build"),
               "GOPATH": os.path.join(root, "go"), **dict(GO_ENV)}
        go = find_executable("go")
        try:
            ok = go is not None and subprocess.run(
                [go, "test", "-c", "-o", os.path.join(root, "warm.test"), src], env=env, cwd=root,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        _GO_CACHE["dir"] = os.path.join(root, "go-build") if ok else None
        return _GO_CACHE["dir"]


def go_prepare(workdir: str, tmpdir: str) -> None:
    """The run's own copy of the warmed cache (nothing a program does reaches another's)."""
    template = _go_cache_template()
    if template is not None:
        shutil.copytree(template, os.path.join(tmpdir, "go-build"), symlinks=True)


# ----------------------------------------------------------------------------- Lua

LUAUNIT_RUN = re.compile(r"os\.exit\(\s*lu\.LuaUnit\.run\(\s*\)\s*\)")
LUA_WRITE = "local sc_eval_f = assert(io.open({path}, \"w\")); sc_eval_f:write({nonce}); sc_eval_f:close()"


def lua_sentinel(source: str, path: str, nonce: str) -> str:
    """MultiPL-E's Lua tests end with ``os.exit(lu.LuaUnit.run())``: the last one becomes "run,
    write the nonce if nothing failed, exit"; without it the nonce is written after the last line."""
    write = LUA_WRITE.format(path=_literal(path), nonce=_literal(nonce))
    found = list(LUAUNIT_RUN.finditer(source))
    if not found:
        return source + f"\n-- sc_jax.eval sentinel\ndo {write} end\n"
    m = found[-1]
    run = (f"do local sc_eval_rc = lu.LuaUnit.run(); if sc_eval_rc == 0 then {write} end; "
           "os.exit(sc_eval_rc) end -- sc_jax.eval sentinel")
    return source[:m.start()] + run + source[m.end():]


# ----------------------------------------------------------------------------- PHP


def _php_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def php_sentinel(source: str, path: str, nonce: str) -> str:
    """After the last line (re-entering PHP mode when the program ends with ``?>``)."""
    reopen = "<?php" if source.rstrip().endswith("?>") else ""
    return (source + f"\n{reopen}\n// sc_jax.eval sentinel: reached only when everything above ran to its end\n"
            f"file_put_contents({_php_literal(path)}, {_php_literal(nonce)});\n")


# ----------------------------------------------------------------------------- TypeScript

#: MultiPL-E's TypeScript tests declare `require` themselves (no @types/node); a second identical
#: `declare var` is allowed, and keeps the sentinel type-correct when they do not
TYPESCRIPT_SENTINEL = (
    "\n"
    ";// sc_jax.eval sentinel: reached only when everything above ran to its end\n"
    "declare var require: any;\n"
    "require(\"fs\").writeFileSync({path}, {nonce});\n"
)

# ----------------------------------------------------------------------------- the table

#: JVM flags of both stages: one GC thread set (fits RLIMIT_NPROC), no /tmp/hsperfdata (read-only)
_JVM = ("-XX:+UseSerialGC", "-XX:-UsePerfData")

EXECUTORS = (
    Executor(
        "cpp", ".cpp", ("{dir}/program",), aliases=("c++", "cxx"),
        compile=("g++", "-std=c++17", "-o", "{dir}/program", "{file}"),
        sentinel=cpp_sentinel, install="Debian's g++",
    ),
    Executor(
        "java", ".java",
        # the JVM reserves address space far beyond its use: limit the data segment, the heap to half of it
        ("java", *_JVM, "-Xmx{heap_mb}m", "-Djava.io.tmpdir={dir}/tmp", "-ea",
         "-cp", "{dir}:{javatuples}", JAVA_MAIN_CLASS),
        memory_rlimit="DATA", filename="Problem.java",
        compile=("javac", *(f"-J{flag}" for flag in _JVM), "-J-XX:TieredStopAtLevel=1", "-J-Xmx1g",
                 "-encoding", "UTF-8", "-cp", "{javatuples}", "-d", "{dir}", "{file}"),
        compile_memory_rlimit="DATA", sentinel=java_sentinel, libraries=(JAVATUPLES,),
        install="Debian's openjdk-17-jdk-headless and libjavatuples-java",
    ),
    Executor(
        "go", "_test.go", ("{dir}/program.test", "-test.paniconexit0", "-test.timeout=0"),
        aliases=("golang", "go_test.go"), filename="program_test.go",
        compile=("go", "test", "-c", "-o", "{dir}/program.test", "{file}", "{dir}/" + GO_SENTINEL_FILE),
        env=(("GOCACHE", "{tmp}/go-build"), ("GOPATH", "{tmp}/go"), *GO_ENV),
        extra_files=go_sentinel_file, prepare=go_prepare, install="Debian's golang-go",
    ),
    Executor(
        "rust", ".rs", ("{dir}/program",), aliases=("rs",),
        compile=("rustc", "{file}", "-o", "{dir}/program"),
        sentinel=rust_sentinel, requires=("cc",), install="Debian's rustc (and gcc, its linker)",
    ),
    Executor(
        "php", ".php", ("php", "{file}"),
        compile=("php", "-l", "{file}"),
        sentinel=php_sentinel, install="Debian's php-cli",
    ),
    Executor(
        "lua", ".lua", ("lua5.4", "{file}"),
        compile=("luac5.4", "-p", "{file}"),
        sentinel=lua_sentinel, libraries=(LUAUNIT,), install="Debian's lua5.4 and lua-unit",
    ),
    Executor(
        "typescript", ".ts",
        ("node", "--max-old-space-size={memory_mb}", "--stack-size=4000", "{dir}/program.js"),
        memory_rlimit="DATA", aliases=("ts",),
        # --skipLibCheck: TypeScript's own lib .d.ts files are not re-checked (half of tsc's time); every
        # error in the program is still reported
        compile=("tsc", "--target", "esnext", "--skipLibCheck", "{file}"),
        compile_memory_rlimit="DATA", sentinel=TYPESCRIPT_SENTINEL,
        install="Debian's node-typescript (or npm's typescript) and nodejs",
    ),
)

for _executor in EXECUTORS:
    register_executor(_executor)
