"""Defog sql-eval protocol (`python -m sc_jax.eval sql`): the shipped questions over two defog-data
databases, scored against a real PostgreSQL server this module starts (initdb in a temporary
directory, as an unprivileged user) and against SQLite copies of the same databases."""

import json
import math
import os
import pwd
import sys
import time
import types

import pytest

from sc_jax.eval import sql, sql_data, sql_db
from sc_jax.eval.__main__ import main
from sc_jax.eval.sql_compare import compare_df, normalize_table, order_by_terms, subset_df
from sc_jax.eval.sql_db import PostgresEngine, QueryError, Table, TemporaryPostgres, _connect

QUESTIONS = sql_data.load_questions()
BY_NAME = {q.name: q for q in QUESTIONS}
DBS = sorted({q.db_name for q in QUESTIONS})
TIMEOUT = 2.0


@pytest.fixture(scope="session")
def pg_server():
    with TemporaryPostgres(progress=False) as server:
        assert server.restore(DBS) == DBS
        yield server
    assert server.root is None  # stopped and removed


@pytest.fixture(scope="module")
def engines(pg_server):
    with sql.open_engine("sqlite", DBS, progress=False) as lite, \
            sql.open_engine("postgres", DBS, dsn=pg_server.reader_dsn, progress=False) as pg:
        yield {"postgres": pg, "sqlite": lite}


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request, engines):
    return engines[request.param]


def score(engine, name, query):
    return sql.score_sample(engine, BY_NAME[name], query, timeout=TIMEOUT, decimal_points=None)


def fingerprint(engine):
    """Every row of the restaurants database."""
    return {t: sorted(engine.run("restaurants", f"SELECT * FROM {t}", 5).rows, key=repr)
            for t in ("restaurant", "location", "geographic")}


# ----------------------------------------------------------------------------- questions, prompts


def test_shipped_questions_cover_two_databases_and_sql_eval_categories():
    assert len(QUESTIONS) == 22 and DBS == ["academic", "restaurants"]
    assert {q.query_category for q in QUESTIONS} == {"group_by", "order_by", "ratio", "table_join", "where"}
    assert sum("{" in q.query for q in QUESTIONS) >= 6 and any(";S" in q.query for q in QUESTIONS)


def test_gold_alternatives_expand_columns_and_semicolons_as_sql_eval():
    assert sql_data.gold_alternatives("SELECT {a.name, a.aid} FROM a GROUP BY {} HAVING COUNT(*) > 1;") == [
        "SELECT a.name FROM a GROUP BY a.name HAVING COUNT(*) > 1",
        "SELECT  a.aid FROM a GROUP BY  a.aid HAVING COUNT(*) > 1",
        "SELECT a.name,  a.aid FROM a GROUP BY a.name,  a.aid HAVING COUNT(*) > 1",
    ]
    assert sql_data.gold_alternatives("SELECT x FROM t;SELECT y FROM t;") == ["SELECT x FROM t", "SELECT y FROM t"]
    assert sql_data.extract_query("SELECT 1 FROM t;\n```\nmore") == "SELECT 1 FROM t;"
    assert sql_data.extract_query(" SELECT 2\n```", "[SQL]") == "SELECT 2\n```;"
    assert sql_data.extract_query("SELECT 3 [/SQL] x", "[SQL]") == "SELECT 3;"


def test_prompt_has_the_ddl_with_defog_data_column_descriptions():
    q = BY_NAME["restaurants/5"]
    prompt = sql_data.build_prompt(q, sql_data.load_prompt_template(), k_shot=False)
    assert "`How many restaurants are there in each region?`" in prompt
    assert "CREATE TABLE restaurant (\n  id bigint, --Unique identifier for each restaurant\n" in prompt
    assert "  rating real, --The rating of the restaurant on a scale of 0 to 5\n" in prompt
    assert "Follow the instructions below to generate the query:\nCount restaurants, not cities.\nUse the" in prompt
    assert prompt.endswith("```sql\n") and "Adhere closely" not in prompt
    shot = sql_data.build_prompt(BY_NAME["restaurants/0"], sql_data.load_prompt_template(), k_shot=True)
    assert "Adhere closely to the following correct examples as references for answering the question:\n" \
           "Question: How many restaurants are there in Miami?\nQuery: SELECT" in shot


# ----------------------------------------------------------------------------- sql-eval's comparison rules


def T(columns, *rows):
    return Table(list(columns), [tuple(r) for r in rows])


def test_exact_match_ignores_column_and_row_order_and_duplicates_unless_ordered():
    gold = T(["city", "n"], ("LA", 3), ("NY", 2))
    assert compare_df(gold, T(["n", "city"], (2, "NY"), (3, "LA"), (3, "LA")), "group_by", "How many per city?")
    assert not compare_df(gold, T(["n", "city"], (2, "NY")), "group_by", "How many per city?")
    # column names only order the columns: an alias sorting elsewhere breaks exact match
    assert not compare_df(gold, T(["a_count", "city"], (2, "NY"), (3, "LA")), "group_by", "How many per city?")
    assert compare_df(T(["n"], (1.0,)), T(["n"], (1,)), "where", "q") and compare_df(T(["a"]), T(["b"]), "where", "q")


def test_ordered_questions_compare_rows_sorted_by_each_querys_order_by():
    q = "List cities, sorted by n."
    gold = T(["city", "n"], ("LA", 3), ("NY", 2))
    gold_sql = "SELECT city, n FROM t ORDER BY n DESC"
    assert order_by_terms(gold_sql) == (["n"], False) and order_by_terms("x ORDER BY t.n ASC, m") == (["n"], True)
    assert compare_df(gold, T(["city", "n"], ("LA", 3), ("NY", 2)), "order_by", q, gold_sql, "SELECT .. ORDER BY n DESC")
    assert not compare_df(gold, T(["city", "n"], ("NY", 2), ("LA", 3)), "order_by", q, gold_sql, "SELECT .. ORDER BY n ASC")
    # no ORDER BY in the generated query: its rows stay as returned
    assert not compare_df(gold, T(["city", "n"], ("NY", 2), ("LA", 3)), "order_by", q, gold_sql, "SELECT city, n FROM t")
    norm = normalize_table(T(["b", "a"], (1, "x"), (2, "y")), "order_by", q, "SELECT a, b FROM t ORDER BY b")
    assert norm.columns == ["a", "b"] and norm.rows == [("y", 2), ("x", 1)]  # no ASC reads as descending


def test_subset_match_takes_extra_generated_columns():
    gold = T(["name"], ("A",), ("B",))
    assert subset_df(gold, T(["id", "name"], (2, "B"), (1, "A")), "where", "q")
    assert not subset_df(gold, T(["id"], (1,), (2,)), "where", "q")
    assert not subset_df(T(["name"]), T(["name"]), "where", "q")  # an empty gold result never subset-matches
    assert subset_df(T(["r"], (1 / 3,)), T(["r", "x"], (0.333333334, 1)), "ratio", "q")  # pandas' float tolerance
    assert not subset_df(T(["r"], (0.33,)), T(["r"], (0.34,)), "ratio", "q")
    assert compare_df(T(["a", "b"], (None, 1)), T(["a", "b"], (None, 1)), "where", "q")


# ----------------------------------------------------------------------------- on real databases

CASES = [  # (question, generated query, exact, correct)
    ("restaurants/1", "SELECT city_name, AVG(rating) AS average_rating FROM restaurant GROUP BY city_name "
                      "ORDER BY city_name DESC", True, True),
    ("restaurants/1", "SELECT AVG(rating) AS avg_r, city_name FROM restaurant GROUP BY city_name", True, True),
    ("restaurants/1", "SELECT AVG(rating) AS z_avg, city_name FROM restaurant GROUP BY city_name", False, True),
    ("restaurants/1", "SELECT city_name, MAX(rating) AS average_rating FROM restaurant GROUP BY city_name", False, False),
    ("restaurants/2", "SELECT id, rating FROM restaurant WHERE city_name = 'New York' ORDER BY rating DESC", True, True),
    ("restaurants/2", "SELECT name, rating FROM restaurant WHERE city_name = 'New York' ORDER BY rating DESC",
     True, True),
    ("restaurants/2", "SELECT name, rating FROM restaurant WHERE city_name = 'New York' ORDER BY rating ASC",
     False, False),
    ("restaurants/2", "SELECT name, rating FROM restaurant WHERE city_name = 'New York'", False, False),
    ("restaurants/3", "SELECT name FROM restaurant WHERE rating > 4.5", True, True),
    ("restaurants/3", "SELECT name, rating FROM restaurant WHERE rating > 4.5", False, True),
    ("restaurants/3", "SELECT name FROM restaurant WHERE rating >= 4.5", False, False),
    ("restaurants/5", "SELECT region, COUNT(*) AS restaurant_count FROM geographic g JOIN restaurant r "
                      "ON g.city_name = r.city_name GROUP BY region ORDER BY 2", True, True),
    ("restaurants/6", "SELECT city_name, AVG(CASE WHEN food_type = 'American' THEN 1.0 ELSE 0 END) AS american_ratio "
                      "FROM restaurant GROUP BY city_name", True, True),
    ("academic/12", "SELECT a.name, a.aid FROM author a JOIN writes w ON a.aid = w.aid GROUP BY a.name, a.aid "
                    "HAVING COUNT(*) > 1", True, True),
    ("academic/12", "SELECT a.aid FROM author a WHERE a.aid IN (1, 2)", True, True),
    ("academic/13", "SELECT j.name, COALESCE(SUM(p.citation_num), 0) AS total_citations FROM journal j "
                    "LEFT JOIN publication p ON j.jid = p.jid GROUP BY j.name", True, True),
    ("academic/13", "SELECT j.name, SUM(p.citation_num) AS total_citations FROM journal j "
                    "LEFT JOIN publication p ON j.jid = p.jid GROUP BY j.name", False, False),
    ("academic/14", "SELECT title, citation_num FROM publication ORDER BY citation_num DESC, title", True, True),
    ("academic/21", "SELECT COUNT(*) AS authors_without_homepage FROM author WHERE homepage = ''", False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}:{c[1][:40]}")
def test_generated_queries_score_as_sql_eval(engine, case):
    name, query, exact, correct = case
    rec = score(engine, name, query)
    assert (rec["exact_match"], rec["correct"], rec["error_db_exec"], rec["error_msg"]) == (exact, correct, False, "")


def test_every_gold_query_runs_and_gives_the_same_result_on_postgres_and_sqlite(engines):
    pg, lite = engines["postgres"], engines["sqlite"]
    for q in QUESTIONS:
        for alt in sql_data.gold_alternatives(q.query):
            a, b = pg.run(q.db_name, alt, TIMEOUT), lite.run(q.db_name, alt, TIMEOUT)
            na, nb = (normalize_table(t, "group_by", "") for t in (a, b))
            assert na.columns == nb.columns and len(na.rows) == len(nb.rows) > 0, (q.name, alt)
            for ra, rb in zip(na.rows, nb.rows):  # float4 `rating` averages differ in the 8th digit
                assert all(math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) else x == y
                           for x, y in zip(ra, rb)), (q.name, alt, ra, rb)


HOSTILE = [
    "DROP TABLE restaurant",
    "UPDATE restaurant SET rating = 0",
    "DELETE FROM location",
    "SELECT 1; DROP TABLE geographic",
    "COMMIT; DROP TABLE restaurant",
    "CREATE TABLE evil (x int)",
    "WITH d AS (DELETE FROM restaurant RETURNING *) SELECT * FROM d",
    "INSERT INTO restaurant (id, name) VALUES (99, 'evil')",
    "ATTACH DATABASE 'evil.db' AS evil",
]


def test_generated_sql_can_never_write(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = fingerprint(engine)
    for query in HOSTILE:
        rec = score(engine, "restaurants/0", query)
        assert rec["error_db_exec"] and not rec["correct"] and rec["error_msg"].startswith("QUERY EXECUTION ERROR"), query
    assert fingerprint(engine) == before and os.listdir(tmp_path) == []
    assert score(engine, "restaurants/0", BY_NAME["restaurants/0"].query)["exact_match"]


def test_the_reader_role_has_select_rights_only(pg_server):
    with _connect(pg_server.reader_dsn, "restaurants", autocommit=True) as conn:
        for stmt in ("SET default_transaction_read_only = off", "SET statement_timeout = 0"):
            conn.execute(stmt)  # even outside our read-only transactions, the role cannot write
        for stmt in ("UPDATE restaurant SET rating = 0", "DROP TABLE restaurant", "CREATE TABLE evil (x int)",
                     "CREATE TEMP TABLE evil (x int)"):
            with pytest.raises(Exception, match="permission denied|must be owner"):
                conn.execute(stmt)
    assert PostgresEngine(pg_server.reader_dsn).describe_role("academic") is None
    assert "can do anything" in PostgresEngine(pg_server.admin_dsn).describe_role("academic")


def test_pg_sleep_times_out_and_the_backend_is_cancelled(engines, pg_server):
    pg = engines["postgres"]
    for query in ("SELECT pg_sleep(60)", "SELECT set_config('statement_timeout', '0', false), pg_sleep(60)"):
        t0 = time.monotonic()
        rec = score(pg, "restaurants/0", query)
        assert rec["timeout"] and not rec["error_db_exec"] and time.monotonic() - t0 < TIMEOUT + 3, rec
    assert active_sleeps(pg_server) == 0
    assert score(pg, "restaurants/0", BY_NAME["restaurants/0"].query)["exact_match"]  # the connection still works


def test_sqlite_runaway_query_times_out(engines):
    t0 = time.monotonic()
    rec = score(engines["sqlite"], "restaurants/0",
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c")
    assert rec["timeout"] and time.monotonic() - t0 < TIMEOUT + 3, rec
    assert score(engines["sqlite"], "restaurants/0", "SELECT pg_sleep(60)")["error_db_exec"]  # no such function


def test_the_watchdog_cancels_a_query_the_server_does_not(engines, monkeypatch):
    monkeypatch.setattr(sql_db, "WATCHDOG_GRACE_S", -0.7 * TIMEOUT)  # fire before statement_timeout
    t0 = time.monotonic()
    rec = score(engines["postgres"], "restaurants/0", "SELECT pg_sleep(60)")
    assert rec["timeout"] and time.monotonic() - t0 < TIMEOUT, rec
    assert score(engines["postgres"], "restaurants/0", BY_NAME["restaurants/0"].query)["exact_match"]


def active_sleeps(pg_server) -> int:
    with _connect(pg_server.admin_dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                            "AND state = 'active' AND pid <> pg_backend_pid()").fetchone()[0]


# each batch of rows is its own FETCH, each with its own statement_timeout: the first query switches
# it off for the later FETCHes, the second stays under it in every FETCH (1, 2, ..., 64 rows)
SLOW_FETCHES = ("SELECT set_config('statement_timeout', '0', false), pg_sleep(0.3) FROM generate_series(1, 100)",
                "SELECT pg_sleep(0.02) FROM generate_series(1, 1000)")


@pytest.mark.parametrize("grace", [sql_db.WATCHDOG_GRACE_S, 60.0], ids=["watchdog", "no-watchdog"])
@pytest.mark.parametrize("query", SLOW_FETCHES, ids=["timeout-off", "many-fetches"])
def test_a_query_over_many_fetches_stops_at_the_time_limit(engines, pg_server, monkeypatch, grace, query):
    monkeypatch.setattr(sql_db, "WATCHDOG_GRACE_S", grace)  # 60: the deadline between FETCHes alone
    t0 = time.monotonic()
    rec = score(engines["postgres"], "restaurants/0", query)
    assert rec["timeout"] and not rec["error_db_exec"] and time.monotonic() - t0 < TIMEOUT + 2, rec
    assert active_sleeps(pg_server) == 0
    assert score(engines["postgres"], "restaurants/0", BY_NAME["restaurants/0"].query)["exact_match"]


def test_the_watchdog_repeats_until_the_block_exits_and_never_after():
    calls = []
    with sql_db._watchdog(0.1, lambda: calls.append(time.monotonic())) as fired:
        time.sleep(0.75)  # fires at 0.1, 0.3, 0.5, 0.7 s
    n, exited = len(calls), time.monotonic()
    time.sleep(0.5)
    assert fired == [True] and 3 <= n == len(calls) and calls[-1] < exited
    with sql_db._watchdog(0.1, lambda: calls.append(0)) as fired:
        pass
    time.sleep(0.3)
    assert fired == [] and len(calls) == n


def test_the_server_runs_as_an_unprivileged_user(pg_server):
    owner = os.stat(os.path.join(pg_server.root, "data")).st_uid
    assert owner != 0 and owner == (os.getuid() if os.getuid() != 0 else pwd.getpwnam("nobody").pw_uid)


def test_too_many_rows_is_an_error(engines):
    eng = sql.PostgresEngine(engines["postgres"].dsn, max_rows=10, max_bytes=1 << 20)
    assert len(eng.run("restaurants", "SELECT * FROM generate_series(1, 10)", TIMEOUT).rows) == 10
    with pytest.raises(QueryError, match="more than 10 rows"):
        eng.run("restaurants", "SELECT * FROM generate_series(1, 11)", TIMEOUT)
    with pytest.raises(QueryError, match="larger than 1 MiB"):  # after the first 2 of its 10 rows
        eng.run("restaurants", "SELECT repeat('x', 600000) FROM generate_series(1, 10)", TIMEOUT)
    eng.close()
    lite = sql_db.SqliteEngine(engines["sqlite"].db_dir, max_bytes=1 << 20)
    with pytest.raises(QueryError, match="larger than 1 MiB"):
        lite.run("restaurants", "SELECT printf('%.*c', 600000, 'x') FROM restaurant", TIMEOUT)
    lite.close()


# ----------------------------------------------------------------------------- the command


def test_check_gold_on_sqlite_and_report_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sql", "--check-gold", "--engine", "sqlite", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| sql-gold | all | 22 | 22 | 100.00 | 100.00 | 0.00 | 0.00 |" in printed
    assert sorted(os.listdir(out)) == ["problems.jsonl", "samples.jsonl", "summary.json", "summary.md"]
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 22 and all(r["exact_match"] for r in recs)


def test_samples_jsonl_scored_on_postgres_via_dsn(pg_server, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    lines = [{"index": q.index, "completion": f" {sql_data.gold_alternatives(q.query)[0]};\n```"} for q in QUESTIONS]
    lines[0] = {"problem": "restaurants/0", "generated_query": "SELECT pg_sleep(60)"}
    lines[1]["completion"] = "SELECT nope FROM restaurant;"
    lines[3]["completion"] = "SELECT name, rating FROM restaurant WHERE rating > 4.5"  # subset only
    lines.append({"index": 2, "completion": "DROP TABLE restaurant"})  # a second sample of question 2
    samples.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    assert main(["sql", "--samples", str(samples), "--dsn", pg_server.reader_dsn, "--timeout", "1",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["query_category"]: r for r in summary["rows"]}
    assert rows["all"]["samples"] == 23 and rows["all"]["questions"] == 22
    assert rows["all"]["exact_match"] == pytest.approx(19 / 23) and rows["all"]["correct"] == pytest.approx(20 / 23)
    assert rows["all"]["timeout"] == pytest.approx(1 / 23) and rows["all"]["error_db_exec"] == pytest.approx(2 / 23)
    assert rows["where"]["samples"] == 5 and summary["meta"]["engine"] == "postgres"
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert {p["problem"]: p["n"] for p in problems}["restaurants/2"] == 2
    assert "warning" not in capsys.readouterr().err  # a SELECT-only role


class _SqlGenerator:
    """What `load_generator` returns: answers each prompt with its question's gold query."""

    def __init__(self):
        template = sql_data.load_prompt_template()
        self.answers = {sql_data.build_prompt(q, template, db_type="sqlite"): sql_data.gold_alternatives(q.query)[-1]
                        for q in QUESTIONS}
        self.calls = []

    def complete(self, prompts, *, max_new_tokens, temperature, top_p, top_k, stop, seed):
        self.calls.append((len(prompts), max_new_tokens, temperature, tuple(stop)))
        return [" " + self.answers[p] + ";\n```\n\nmore text" for p in prompts]


def test_generation_through_load_generator(monkeypatch, tmp_path, capsys):
    gen = _SqlGenerator()
    mod = types.ModuleType("sc_jax.generate")
    mod.load_generator = lambda path, **kw: gen
    monkeypatch.setitem(sys.modules, "sc_jax.generate", mod)
    out = tmp_path / "out"
    assert main(["sql", "--ckpt", str(tmp_path), "--engine", "sqlite", "--limit", "5", "--out", str(out),
                 "--no-progress"]) == 0
    assert gen.calls == [(5, 600, 0.0, ("```", ";"))]
    assert "| sql | all | 5 | 5 | 100.00 | 100.00 | 0.00 | 0.00 |" in capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert recs[0]["generated_query"] == BY_NAME["restaurants/0"].query


@pytest.mark.slow
def test_a_real_checkpoint_end_to_end(tmp_path, capsys):
    """A tiny random Hugging Face model through load_generator: its text is garbage SQL, scored as an error."""
    import torch
    import transformers

    from sc_jax.tokenizer import train_tokenizer

    path = tmp_path / "model"
    torch.manual_seed(0)
    config = transformers.StableLmConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)
    transformers.StableLmForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    template = sql_data.load_prompt_template()
    texts = [sql_data.build_prompt(q, template) + q.query for q in QUESTIONS]
    train_tokenizer(texts, vocab_size=512).backend.save(str(path / "tokenizer.json"))
    out = tmp_path / "out"
    assert main(["sql", "--ckpt", str(path), "--engine", "sqlite", "--limit", "1", "--max-new-tokens", "4",
                 "--out", str(out), "--no-progress"]) == 0
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and isinstance(recs[0]["completion"], str) and recs[0]["generated_query"].endswith(";")
    assert recs[0]["error_db_exec"] or recs[0]["exact_match"] in (True, False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["max_new_tokens"] == 4 and summary["meta"]["ckpt"] == str(path)


def test_dsn_restore_creates_missing_databases_and_warns_about_a_writing_role(pg_server, tmp_path, capsys):
    questions = tmp_path / "q.csv"
    questions.write_text("question,query,db_name,query_category\n"
                         "How many states border Texas?,SELECT COUNT(*) FROM border_info WHERE state_name = 'Texas';,"
                         "geography,where\n")
    args = ["sql", "--check-gold", "--questions", str(questions), "--dsn", pg_server.admin_dsn, "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "before")]) == 2  # no geography database yet
    assert "cannot connect to database 'geography'" in capsys.readouterr().err
    assert main([*args, "--restore", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "role 'postgres' can do anything in 'geography'" in err
    assert "| sql-gold | all | 1 | 1 | 100.00 | 100.00 | 0.00 | 0.00 |" in (tmp_path / "out" / "summary.md").read_text()
    assert not (tmp_path / "before").exists()


def test_a_dsn_password_is_never_printed(tmp_path, capsys):
    for dsn in ("host=/nonexistent port=5 password=s3cret", "postgresql://u:s3cret@/db?host=/nonexistent"):
        assert main(["sql", "--check-gold", "--dsn", dsn, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot connect") and "s3cret" not in err
