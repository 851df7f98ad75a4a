"""Defog sql-eval's inputs: the `defog-data` databases, question CSVs, gold-query alternatives, prompts.

* Databases: `defog-data` (PyPI, pinned) ships, per database, a PostgreSQL dump
  ``<db>/<db>.sql`` and ``<db>/<db>.json`` with each column's type and description.
  :func:`parse_dump` reads a dump into its statements and COPY blocks: the PostgreSQL
  restore replays them, the SQLite copy is built from the same parse.
* Questions: sql-eval's CSV layout, one row per question: ``question, query, db_name,
  query_category`` and optional ``instructions``, ``k_shot_prompt``, ``glossary``.
* Gold queries: ``;`` separates acceptable alternatives and ``{a, b}`` lists columns any
  non-empty combination of which is acceptable (:func:`gold_alternatives`, as sql-eval's
  ``get_all_minimal_queries``).
* Prompts: a template with sql-eval's ``{placeholders}``; the schema is the DDL sql-eval's
  ``to_prompt_schema`` writes from the column descriptions (:func:`prompt_schema`).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import importlib.util
import itertools
import json
import os
import re
import string
from typing import Any

from sc_jax.data.sources import DataError

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "sql")
#: ~20 questions over two defog-data databases (restaurants, academic), gold queries checked on both engines
DEFAULT_QUESTIONS = os.path.join(EXAMPLES_DIR, "questions.csv")
#: sql-eval's prompts/README.md template for a completion model: ends in an open ```sql block
DEFAULT_PROMPT = os.path.join(EXAMPLES_DIR, "prompt.md")
REQUIRED_COLUMNS = ("question", "query", "db_name", "query_category")
PROMPT_FIELDS = ("user_question", "db_type", "instructions", "table_metadata_string", "k_shot_prompt", "glossary",
                 "table_aliases", "join_str", "pruned_join_hints", "instruction_reflections")
#: sql-eval's hf_runner cuts a completion at the first of these (``split("```")[0].split(";")[0]``),
#: or, for a prompt with sqlcoder's ``[SQL]`` tag, at ``[/SQL]`` and ``;``
SQL_STOP = ["```", ";"]
SQLCODER_STOP = ["[/SQL]", ";"]


# ----------------------------------------------------------------------------- defog-data


def defog_data_dir() -> str:
    """The installed `defog_data` package directory (found without importing its metadata
    module, which prints on import)."""
    spec = importlib.util.find_spec("defog_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the defog-data package is not installed: pip install defog-data==0.1.1")
    return list(spec.submodule_search_locations)[0]


def defog_databases() -> list[str]:
    root = defog_data_dir()
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, f"{d}.sql")))


def _defog_file(db_name: str, ext: str) -> str:
    path = os.path.join(defog_data_dir(), db_name, f"{db_name}.{ext}")
    if not os.path.isfile(path):
        raise DataError(f"defog-data has no database {db_name!r}: use one of {', '.join(defog_databases())}")
    return path


@functools.cache
def defog_metadata(db_name: str) -> dict[str, Any]:
    """``{"table_metadata": {table: [{column_name, data_type, column_description}]}, "glossary": str}``."""
    with open(_defog_file(db_name, "json"), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def defog_join_hints() -> dict[str, dict]:
    """defog-data's ``supplementary.columns_join`` ({db: {(t1, t2): [(t1.c, t2.c)]}}), read as a
    literal: importing that module loads sentence-transformers."""
    path = os.path.join(defog_data_dir(), "supplementary.py")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "columns_join" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


@dataclasses.dataclass
class Dump:
    """A pg_dump plain-text file: `items` in order, SQL statements (ownership and ACL left out:
    the restoring role owns everything and grants are ours) and COPY blocks."""
    items: list[str | Copy]
    tables: dict[str, list[tuple[str, str]]]  # table -> [(column, type)] from CREATE TABLE

    @property
    def copies(self) -> list[Copy]:
        return [item for item in self.items if isinstance(item, Copy)]


@dataclasses.dataclass
class Copy:
    table: str  # without the schema
    columns: list[str]
    header: str  # "COPY public.t (a, b) FROM stdin;"
    lines: list[str]  # COPY text format rows (tab separated, \N = NULL)


_SKIPPED = re.compile(r"^(ALTER\s+(TABLE|SCHEMA)\b.*\bOWNER\s+TO\b|GRANT\b|REVOKE\b)", re.IGNORECASE | re.DOTALL)
_COPY = re.compile(r"^COPY\s+(?:\w+\.)?(\w+)\s*\(([^)]*)\)\s+FROM\s+stdin;$", re.IGNORECASE)
_CREATE = re.compile(r"^CREATE\s+TABLE\s+(?:\w+\.)?(\w+)\s*\((.*)\);?$", re.IGNORECASE | re.DOTALL)


def _create_columns(body: str) -> list[tuple[str, str]]:
    columns = []
    for part in body.split(",\n"):
        words = part.strip().split(None, 1)
        if len(words) == 2 and words[0].upper() not in ("CONSTRAINT", "PRIMARY", "UNIQUE", "FOREIGN", "CHECK"):
            columns.append((words[0].strip('"'), words[1]))
    return columns


@functools.cache
def parse_dump(db_name: str) -> Dump:
    """defog-data's dump of `db_name`: statements end at a line ending in ``;``, COPY data at ``\\.``."""
    path = _defog_file(db_name, "sql")
    items, tables = [], {}
    current: list[str] = []
    copy: Copy | None = None
    with open(path, encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if copy is not None:
                if line == "\\.":
                    items.append(copy)
                    copy = None
                else:
                    copy.lines.append(line)
                continue
            if not current and (not line.strip() or line.startswith("--")):
                continue
            m = _COPY.match(line)
            if m and not current:
                copy = Copy(m.group(1), [c.strip().strip('"') for c in m.group(2).split(",")], line, [])
                continue
            current.append(line)
            if line.rstrip().endswith(";"):
                stmt = "\n".join(current).strip()
                current = []
                if _SKIPPED.match(stmt):
                    continue
                items.append(stmt)
                m = _CREATE.match(stmt)
                if m:
                    tables[m.group(1)] = _create_columns(m.group(2))
    if copy is not None or current:
        raise DataError(f"{path}: the dump ends inside a statement or COPY block: reinstall defog-data")
    return Dump(items, tables)


_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def copy_fields(line: str) -> list[str | None]:
    """One row of PostgreSQL's COPY text format: tab-separated fields, ``\\N`` is NULL, backslash escapes."""
    fields: list[str | None] = []
    for raw in line.split("\t"):
        if raw == "\\N":
            fields.append(None)
            continue
        fields.append(re.sub(r"\\(.)", lambda m: _COPY_ESCAPES.get(m.group(1), m.group(1)), raw))
    return fields


# ----------------------------------------------------------------------------- questions


@dataclasses.dataclass
class Question:
    index: int  # 0-based data row of the CSV, as sql-eval's DataFrame index
    question: str
    query: str  # the gold query, with sql-eval's ``;`` and ``{a, b}`` alternatives
    db_name: str
    query_category: str
    instructions: str = ""
    k_shot_prompt: str = ""
    glossary: str = ""
    prompt: str = ""  # filled by build_prompts
    stop_tokens: list[str] = dataclasses.field(default_factory=lambda: list(SQL_STOP))

    @property
    def name(self) -> str:
        return f"{self.db_name}/{self.index}"


def load_questions(path: str | None = None, *, limit: int | None = None) -> list[Question]:
    """sql-eval's questions CSV: question, query, db_name, query_category (+ instructions,
    k_shot_prompt, glossary). Every db_name must be a defog-data database."""
    path = path or DEFAULT_QUESTIONS
    if not os.path.isfile(path):
        raise DataError(f"questions file not found: {path} (give a CSV with columns {', '.join(REQUIRED_COLUMNS)})")
    known = set(defog_databases())
    questions = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}: sql-eval's layout has "
                                f"{', '.join(REQUIRED_COLUMNS)} (and optional instructions, k_shot_prompt)")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                values = {k: (row.get(k) or "") for k in REQUIRED_COLUMNS + ("instructions", "k_shot_prompt", "glossary")}
                for k in ("question", "query", "db_name"):
                    if not values[k].strip():
                        raise DataError(f"{where}: empty {k!r}: every question needs a question, a gold query and a db_name")
                if values["db_name"] not in known:
                    raise DataError(f"{where}: db_name {values['db_name']!r} is not a defog-data database "
                                    f"(one of {', '.join(sorted(known))})")
                questions.append(Question(index=len(questions), **values))
                if limit is not None and len(questions) >= limit:
                    break
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e}): give a UTF-8 CSV file") from None
    if not questions:
        raise DataError(f"{path}: no questions (one CSV row per question under a header row)")
    return questions


def gold_alternatives(query: str) -> list[str]:
    """sql-eval's ``get_all_minimal_queries``: split at ``;``, and in each part expand the first
    ``{a, b}`` into every non-empty combination of its columns (``GROUP BY {}`` gets the same
    columns); a generated result matching any of them matches."""
    out = []
    for part in query.split(";"):
        part = part.strip()
        if not part:
            continue
        start = part.find("{")
        end = part.find("}", start + 1)
        if start == -1 or end == -1:
            out.append(part)
            continue
        options = part[start + 1 : end].split(",")
        for r in range(1, len(options) + 1):
            for combo in itertools.combinations(options, r):
                columns = ", ".join(combo)
                out.append(part[:start] + columns + part[end + 1 :].replace("GROUP BY {}", f"GROUP BY {columns}"))
    return out


def stop_strings(prompt: str) -> list[str]:
    return list(SQLCODER_STOP if "[SQL]" in prompt else SQL_STOP)


def extract_query(completion: str, prompt: str = "") -> str:
    """sql-eval's hf_runner: the completion up to the first ``` (``[/SQL]`` after a ``[SQL]`` prompt)
    and the first ``;``, stripped, plus ``;``."""
    fence, _ = stop_strings(prompt)
    return completion.split(fence)[0].split(";")[0].strip() + ";"


# ----------------------------------------------------------------------------- prompts


def prompt_schema(db_name: str) -> str:
    """sql-eval's ``to_prompt_schema``: ``CREATE TABLE t (\\n  col type, --description`` per table."""
    out = ""
    for table, columns in defog_metadata(db_name)["table_metadata"].items():
        out += f"CREATE TABLE {table} (\n"
        for i, column in enumerate(columns):
            name = column["column_name"]
            name = f'"{name}"' if " " in name else name
            desc = column.get("column_description", "").replace("\n", " ")
            desc = f" --{desc}" if desc else ""
            comma = "," if i < len(columns) - 1 else ""
            out += f"  {name} {column['data_type']}{comma}{desc}\n"
        out += ");\n"
    return out


def _join_hints(db_name: str) -> tuple[str, str]:
    """sql-eval's join_str and pruned_join_str from defog-data's columns_join."""
    joins, pruned = [], []
    for pairs in defog_join_hints().get(db_name, {}).values():
        for col_1, col_2 in pairs:
            hint = f"{col_1} can be joined with {col_2}"
            if hint not in joins:
                joins.append(hint)
            if col_1.rsplit(".", 1)[1] != col_2.rsplit(".", 1)[1] and hint not in pruned:
                pruned.append(hint)
    join_str = "\nHere is a list of joinable columns:\n" + "\n".join(joins) if joins else ""
    pruned_str = "\nHere is a list of joinable columns with different names:\n" + "\n".join(pruned) if pruned else ""
    return join_str, pruned_str


def _table_aliases(db_name: str) -> str:
    """sql-eval's table aliases instruction (``-- table AS alias`` per table)."""
    reserved = {"all", "and", "any", "as", "asc", "do", "end", "for", "in", "is", "not", "to"}
    aliases: dict[str, str] = {}
    for table in defog_metadata(db_name)["table_metadata"]:
        table = table.split(".", 1)[-1]
        alias = table[0]
        if (alias in aliases.values() and "_" in table) or alias.lower() in reserved:
            alias = table.split("_")[0][0] + table.split("_")[1][0] if "_" in table else table[:2]
        for candidate in (table[:2], table[:3]):
            if alias in aliases.values() or alias.lower() in reserved:
                alias = candidate
        num = 2
        while alias in aliases.values() or alias.lower() in reserved:
            alias, num = table[0] + str(num), num + 1
        aliases[table] = alias
    return ("Use the following table aliases when referencing tables in the query:\n"
            + "".join(f"-- {t} AS {a}\n" for t, a in aliases.items()))


def load_prompt_template(path: str | None = None) -> str:
    """A prompt template with sql-eval's placeholders (a prompts/*.md file of sql-eval works as is)."""
    path = path or DEFAULT_PROMPT
    if not os.path.isfile(path):
        raise DataError(f"prompt file not found: {path} (give a text template with sql-eval's "
                        "{user_question}, {table_metadata_string}, ... placeholders)")
    with open(path, encoding="utf-8") as f:
        template = f.read()
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise DataError(f"{path}: not a format template ({e}): write literal braces as {{{{ and }}}}") from None
    unknown = sorted(names - set(PROMPT_FIELDS))
    if unknown:
        raise DataError(f"{path}: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}: "
                        f"use {', '.join('{' + n + '}' for n in PROMPT_FIELDS)}")
    return template


def _instructions(text: str) -> str:
    """sql-eval's prepare_questions_df: sentences on their own lines, under a heading."""
    text = text.replace(". ", ".\n")
    return f"\nFollow the instructions below to generate the query:\n{text}\n" if text else ""


def build_prompt(q: Question, template: str, *, db_type: str = "postgres", k_shot: bool = False) -> str:
    """sql-eval's generate_prompt for `q` (a defog-data database: schema from its metadata)."""
    instructions = _instructions(q.instructions)
    k_shot_prompt = ""
    if k_shot:
        k_shot_prompt = ("Adhere closely to the following correct examples as references for answering the question:\n"
                         + q.k_shot_prompt.replace("\\n", "\n"))
    glossary = q.glossary
    glossary = (f"\nCarefully follow these instructions if and only if they are relevant to the question and "
                f"the query you generate:\n{glossary}\n") if glossary else defog_metadata(q.db_name)["glossary"]
    join_str, pruned = _join_hints(q.db_name)
    reflections = instructions.replace(
        "\nFollow the instructions below to generate the query:",
        "\nAdditionally, I was asked to follow the instructions below to generate the query:") + "\n"
    return template.format(
        user_question=q.question, db_type=db_type, instructions=instructions,
        table_metadata_string=prompt_schema(q.db_name), k_shot_prompt=k_shot_prompt, glossary=glossary,
        table_aliases=_table_aliases(q.db_name), join_str=join_str, pruned_join_hints=pruned,
        instruction_reflections=reflections,
    )


def build_prompts(questions: list[Question], template: str, *, db_type: str, k_shot: bool) -> None:
    if k_shot and not any(q.k_shot_prompt for q in questions):
        raise DataError("--k-shot: the questions file has no k_shot_prompt column values: leave --k-shot out "
                        "or add k_shot_prompt examples")
    for q in questions:
        q.prompt = build_prompt(q, template, db_type=db_type, k_shot=k_shot)
        q.stop_tokens = stop_strings(q.prompt)
