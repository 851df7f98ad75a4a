"""sql-eval's result comparison (``eval/eval.py``), on plain Python tables instead of DataFrames.

* :func:`normalize_table`: drop duplicate rows, sort columns by name; then, unless the
  question orders (category ``order_by``, or "order", "sort", "arrange" in it), sort rows
  by every column. When it orders, rows are sorted by the first ORDER BY term of `sql` (the
  query that made the table) then the other columns, descending unless it says ASC, as
  sql-eval's regex reads it; that column moves last.
* :func:`compare_df` (exact match): equal as returned, or equal after normalising (NULL
  reads as -99999 there).
* :func:`subset_df` (subset match): every gold column equals, as a sorted column of values
  (floats to pandas' default tolerance), a distinct generated column, and the generated
  table cut to those columns equals the gold one after normalising.
* :func:`compare_query_results`: run the generated query once and each gold alternative;
  exact if any alternative matches exactly, correct if any matches exactly or as a subset.

Where pandas would raise (columns with one name twice, values of mixed types that do not
order) these compare as well as they can instead: duplicate names keep their order, mixed
values order by type name.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Any

from sc_jax.eval.sql_data import Question, gold_alternatives
from sc_jax.eval.sql_db import QueryError, Table

ORDER_WORDS = re.compile(r"\b(order|sort|arrange)\b", re.IGNORECASE)
_ORDER_CLAUSE = re.compile(r"ORDER BY[\s\S]*", re.IGNORECASE)
_ORDER_TERMS = re.compile(r"(?<=ORDER BY)(.*?)(?=;|,|\)|$)", re.IGNORECASE)
_ORDER_SKIP = {"desc", "asc", "nulls", "last", "first", "limit"}
NULL_FILL = -99999  # sql-eval's fillna value before the normalised comparison
RTOL, ATOL = 1e-5, 1e-8  # pandas.testing's tolerance for floats (check_exact=False)


class GoldQueryError(QueryError):
    """A gold query failed: the question's data is wrong (reported apart from generated SQL errors)."""


# ----------------------------------------------------------------------------- values


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not _is_null(v)


def _compare(a: Any, b: Any) -> int:
    try:
        return (a > b) - (a < b)
    except TypeError:  # values of types that do not order (pandas would raise): by type name, then text
        ka, kb = (type(a).__name__, str(a)), (type(b).__name__, str(b))
        return (ka > kb) - (ka < kb)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == does not give one truth value
        return False


def _close(a: Any, b: Any) -> bool:
    """pandas.testing's assert_*_equal(check_exact=False) for one value."""
    if _is_null(a) or _is_null(b):
        return _is_null(a) and _is_null(b)
    if _is_number(a) and _is_number(b) and not (isinstance(a, bool) and isinstance(b, bool)):
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    return _equal(a, b)


def _hashable(v: Any) -> Any:
    if _is_null(v):
        return None  # pandas.drop_duplicates treats NaN and None as the same missing value
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def round_table(table: Table, decimal_points: int | None) -> Table:
    """sql-eval's ``--decimal_points``: floats rounded (DataFrame.round)."""
    if not decimal_points:
        return table
    return Table(table.columns, [tuple(round(v, decimal_points) if isinstance(v, float) else v for v in row)
                                 for row in table.rows])


# ----------------------------------------------------------------------------- normalising


def _sort_rows(rows: list[tuple], order: list[int], ascending: bool = True) -> list[tuple]:
    """pandas sort_values(by=order, ascending): lexicographic, missing values last either way."""
    def cmp(r1, r2):
        for i in order:
            a, b = r1[i], r2[i]
            if _is_null(a) or _is_null(b):
                if _is_null(a) and _is_null(b):
                    continue
                return 1 if _is_null(a) else -1
            c = _compare(a, b)
            if c:
                return c if ascending else -c
        return 0
    return sorted(rows, key=functools.cmp_to_key(cmp))


def _select(table: Table, order: list[int]) -> Table:
    return Table([table.columns[i] for i in order], [tuple(row[i] for i in order) for row in table.rows])


def _drop_duplicates(rows: list[tuple]) -> list[tuple]:
    seen, out = set(), []
    for row in rows:
        key = tuple(_hashable(v) for v in row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def deduplicate_columns(columns: list[str]) -> list[str]:
    """sql-eval's deduplicate_columns: a name used twice becomes ``name_<position>``."""
    counts = Counter(columns)
    return [f"{c}_{i}" if counts[c] > 1 else c for i, c in enumerate(columns)]


def asks_order(question: str, query_category: str) -> bool:
    return query_category == "order_by" or ORDER_WORDS.search(question.lower()) is not None


def order_by_terms(sql: str) -> tuple[list[str], bool]:
    """The column names sql-eval reads from `sql`'s first ORDER BY term, and whether ascending
    (only an explicit ASC; no direction reads as descending, as there)."""
    clause = _ORDER_CLAUSE.search(sql)
    if not clause:
        return [], True
    terms = _ORDER_TERMS.findall(clause.group(0))
    words = [w.strip().rsplit(".", 1)[-1] for w in (terms[0].split() if terms else [])]
    upper = [w.upper() for w in words]
    ascending = "DESC" not in upper and "ASC" in upper
    words = [w.strip().replace(",", "").replace("(", "") for w in words]
    return [w for w in words if w.lower() not in _ORDER_SKIP], ascending


def normalize_table(table: Table, query_category: str, question: str, sql: str | None = None) -> Table:
    """sql-eval's normalize_table (see the module docstring)."""
    table = Table(table.columns, _drop_duplicates(table.rows))
    table = _select(table, sorted(range(len(table.columns)), key=lambda i: table.columns[i]))
    if not asks_order(question, query_category):
        table = Table(table.columns, _sort_rows(table.rows, list(range(len(table.columns)))))
    elif sql and _ORDER_CLAUSE.search(sql):
        ordered, ascending = order_by_terms(sql)
        others = [i for i, c in enumerate(table.columns) if c not in ordered]
        by_name = {c: i for i, c in reversed(list(enumerate(table.columns)))}
        keys = [by_name[c] for c in ordered if c in by_name]
        table = Table(table.columns, _sort_rows(table.rows, keys + others, ascending))
        table = _select(table, others + keys)
    return Table(deduplicate_columns(table.columns), table.rows)


# ----------------------------------------------------------------------------- matching


def _same_values(t1: Table, t2: Table, *, fill_null: bool = False) -> bool:
    """``(df1.values == df2.values).all()`` for equal shapes."""
    if len(t1.columns) != len(t2.columns) or len(t1.rows) != len(t2.rows):
        return False
    fill = (lambda v: NULL_FILL if _is_null(v) else v) if fill_null else (lambda v: v)
    return all(_equal(fill(a), fill(b)) for r1, r2 in zip(t1.rows, t2.rows) for a, b in zip(r1, r2))


def compare_df(gold: Table, gen: Table, query_category: str, question: str,
               query_gold: str | None = None, query_gen: str | None = None) -> bool:
    """Exact match: the same values as returned, or after normalising each table with its own query."""
    if _same_values(gold, gen):
        return True
    gold = normalize_table(gold, query_category, question, query_gold)
    gen = normalize_table(gen, query_category, question, query_gen)
    return _same_values(gold, gen, fill_null=True)


def _column(table: Table, i: int) -> list[Any]:
    return _sort_rows([(row[i],) for row in table.rows], [0])


def subset_df(sub: Table, sup: Table, query_category: str, question: str) -> bool:
    """Subset match: `sub` (gold) is `sup` (generated) less some columns (see the module docstring)."""
    if not sub.rows or not sub.columns:
        return False
    sub = Table(deduplicate_columns(sub.columns), sub.rows)
    sup = Table(deduplicate_columns(sup.columns), sup.rows)
    free = list(range(len(sup.columns)))
    matched = []
    for i in range(len(sub.columns)):
        want = _column(sub, i)
        for j in free:
            got = _column(sup, j)
            if len(got) == len(want) and all(_close(a[0], b[0]) for a, b in zip(got, want)):
                matched.append(j)
                free.remove(j)
                break
        else:
            return False
    sub_norm = normalize_table(sub, query_category, question)
    picked = _select(sup, matched)
    sup_norm = normalize_table(Table(list(sub.columns), picked.rows), query_category, question)
    return (sub_norm.columns == sup_norm.columns and len(sub_norm.rows) == len(sup_norm.rows)
            and all(_close(a, b) for r1, r2 in zip(sub_norm.rows, sup_norm.rows) for a, b in zip(r1, r2)))


def compare_query_results(engine, q: Question, query_gen: str, *, timeout: float,
                          decimal_points: int | None = None) -> tuple[bool, bool]:
    """(exact_match, correct) of `query_gen` for question `q`, as sql-eval's compare_query_results.
    The generated query's QueryError / QueryTimeout propagate; a gold query's is a GoldQueryError."""
    results_gen = round_table(engine.run(q.db_name, query_gen, timeout), decimal_points)
    correct = False
    for gold_sql in gold_alternatives(q.query):
        try:
            results_gold = round_table(engine.run(q.db_name, gold_sql, timeout), decimal_points)
        except QueryError as e:
            raise GoldQueryError(f"gold query of {q.name} failed: {e} ({gold_sql})") from None
        if compare_df(results_gold, results_gen, q.query_category, q.question, q.query, query_gen):
            return True, True
        if subset_df(results_gold, results_gen, q.query_category, q.question):
            correct = True
    return False, correct
