"""The shape of the source tree, read with `ast` (nothing is imported): functions that fit on a
screen, and the library kept apart from the commands. Each test lists every offender at once."""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "sc_jax")
MAX_FUNCTION_LINES = 80
# Entry points that are plain modules, not a package's __main__.py: run as commands, imported by nothing.
COMMAND_ONLY = {
    "sc_jax.data.inspect",  # python -m sc_jax.data.inspect
    "sc_jax.instruct.dedup",  # python -m sc_jax.instruct.dedup
    "sc_jax.instruct.evolve",  # python -m sc_jax.instruct.evolve
    "sc_jax.eval._launcher",  # run by path (python -I -S _launcher.py) inside the sandbox
}
# The argparse plumbing every command shares: for entry points only.
CLI_PLUMBING = "sc_jax.cli"


def _module_name(path: str) -> str:
    name = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def _modules() -> dict[str, tuple[str, ast.Module]]:
    """Every module of the package: dotted name -> (path relative to the repository, syntax tree)."""
    found = {}
    for directory, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    found[_module_name(path)] = (os.path.relpath(path, REPO), ast.parse(f.read(), path))
    return found


MODULES = _modules()


def _has_main_block(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _is_entry_point(name: str) -> bool:
    """A command: a package's __main__.py, or a module listed as command-only."""
    return name.endswith(".__main__") or name in COMMAND_ONLY


def _library() -> dict[str, tuple[str, ast.Module]]:
    return {name: m for name, m in MODULES.items() if not _is_entry_point(name) and name != CLI_PLUMBING}


def _imports(name: str, path: str, tree: ast.Module) -> set[str]:
    """The modules `name` imports, anywhere in it (imports inside functions count): for
    `from A import B`, A and, when it is a module of the tree, A.B."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return out


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for path, tree in MODULES.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_no_module_imports_an_entry_point():
    entry_points = {name for name in MODULES if _is_entry_point(name)}
    offenders = []
    for name, (path, tree) in MODULES.items():
        for imported in sorted(_imports(name, path, tree) & entry_points - {name}):
            offenders.append(f"{path} imports {imported}")
    assert not offenders, "modules that import an entry point (move what they need into a library module):\n" + \
        "\n".join(offenders)


@pytest.mark.parametrize("plumbing", ["argparse", CLI_PLUMBING])
def test_library_modules_parse_no_command_line(plumbing):
    """Only entry points parse command lines: library modules import neither argparse nor the
    shared plumbing built on it."""
    offenders = [path for name, (path, tree) in _library().items() if plumbing in _imports(name, path, tree)]
    assert not offenders, f"library modules that import {plumbing}:\n" + "\n".join(offenders)


def test_library_modules_are_not_commands():
    """A module run as `python -m` is a package's __main__.py or listed in COMMAND_ONLY (and then
    imported by nothing): a library module has no `if __name__ == "__main__"` block."""
    offenders = [path for path, tree in _library().values() if _has_main_block(tree)]
    assert not offenders, "library modules with a __main__ block:\n" + "\n".join(offenders)


def test_the_checks_see_the_tree():
    """Guards the tests above against reading nothing: the tree is found and its parts recognised."""
    main, humaneval = MODULES["sc_jax.eval.__main__"], MODULES["sc_jax.eval.humaneval"]
    assert _is_entry_point("sc_jax.eval.__main__") and _has_main_block(main[1])
    assert "sc_jax.eval.humaneval" in _library() and not _has_main_block(humaneval[1])
    assert {"sc_jax.eval.execution", "sc_jax.cli", "argparse"} <= _imports("sc_jax.eval.__main__", *main)
    assert all(name in MODULES for name in COMMAND_ONLY)


def test_the_readme_names_every_module():
    """The README's Layout table and "How the code is organised" list keep up with the tree:
    every module is named there (a package's own modules by their file name next to it)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    layout = readme[readme.index("## Layout"):readme.index("## The model and Hugging Face conversion")]
    missing = []
    for path, _ in MODULES.values():
        relative = os.path.relpath(os.path.join(REPO, path), PACKAGE)
        package, file = os.path.split(relative)
        if file in ("__init__.py", "__main__.py"):
            named = f"{package}/" in layout if package else True
        else:
            named = relative in layout or (bool(package) and f"{package}/" in layout and f"`{file}`" in layout)
        if not named:
            missing.append(path)
    assert not missing, f"README's Layout section does not name: {missing}"
