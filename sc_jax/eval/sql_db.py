"""Where sql-eval's queries run: PostgreSQL (a temporary server we start, or ``--dsn``) and SQLite.

Generated SQL is untrusted. Every query, gold or generated, runs

* alone: one statement (PostgreSQL's extended protocol and sqlite3 refuse a second one);
* in a read-only transaction that is always rolled back (PostgreSQL ``BEGIN READ ONLY``;
  SQLite: the file opened read-only, ``PRAGMA query_only`` and an authorizer that allows
  reading only);
* as a role with only SELECT rights where we make the server (``sc_eval_reader``, its
  default transactions read-only too);
* under a time limit: PostgreSQL ``statement_timeout`` and SQLite's progress handler, no
  further batch of rows read once it has passed, and a watchdog behind both that cancels the
  backend (interrupts SQLite) a second later, and again every 0.2 s until the query is over;
* with at most `max_rows` rows and 256 MiB read back, through a server-side cursor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from sc_jax.config import first_line
from sc_jax.fileio import atomic_file
from sc_jax.eval.execution import EvalError
from sc_jax.eval.sql_data import copy_fields, parse_dump

READER_ROLE = "sc_eval_reader"
DEFAULT_MAX_ROWS = 100_000
MAX_RESULT_BYTES = 256 << 20
WATCHDOG_GRACE_S = 1.0  # the server's own limit fires first; the watchdog only if it did not


class QueryError(Exception):
    """The query failed on the database (sql-eval: error_db_exec)."""


class QueryTimeout(QueryError):
    """The query ran past the time limit and was cancelled (sql-eval: timeout)."""


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[tuple]


def _plain(value: Any) -> Any:
    # pandas.read_sql_query's coerce_float turns Decimal into float; sql-eval compares those
    return float(value) if isinstance(value, decimal.Decimal) else value


def _fetch(cursor, max_rows: int, max_bytes: int = MAX_RESULT_BYTES, deadline: float = float("inf")) -> Table:
    """At most `max_rows` rows and about `max_bytes` of values, read in growing batches (1, 2, 4, ...
    rows): a query making huge values is stopped after one batch, not after `max_rows` of them.
    No batch is asked for after `deadline` (time.monotonic()): on PostgreSQL each batch is its own
    FETCH with its own statement_timeout, which the query itself may have switched off."""
    rows: list[tuple] = []
    size, batch = 0, 1
    while True:
        got = cursor.fetchmany(min(batch, max_rows + 1 - len(rows)))
        rows.extend(tuple(_plain(v) for v in row) for row in got)
        size += sum(len(repr(row)) for row in got)
        if len(rows) > max_rows:
            raise QueryError(f"the result has more than {max_rows} rows (--max-rows)")
        if size > max_bytes:
            raise QueryError(f"the result is larger than {max_bytes / 2**20:g} MiB")
        if len(got) < batch:
            break
        if time.monotonic() > deadline:
            raise QueryTimeout("the time limit passed while the rows were read")
        batch = min(2 * batch, 1024)
    columns = [d[0] for d in cursor.description or []]
    return Table(columns, rows)


@contextlib.contextmanager
def _watchdog(seconds: float, stop, every: float = 0.2):
    """Calls `stop()` once the block has run `seconds`, and again every `every` s until it exits
    (PostgreSQL drops a cancel that arrives between two FETCHes); yields a flag list that holds
    True once it did. No call starts after the block exits, so none can hit the next query."""
    fired: list[bool] = []
    finished = threading.Event()
    lock = threading.Lock()  # held by each stop() and by the exit: they never overlap

    def watch():
        delay = seconds
        while not finished.wait(max(delay, 0.0)):
            with lock:
                if finished.is_set():
                    return
                fired[:] = [True]
                with contextlib.suppress(Exception):  # a connection already gone needs no cancelling
                    stop()
            delay = every

    threading.Thread(target=watch, daemon=True, name="sql-watchdog").start()
    try:
        yield fired
    finally:
        with lock:
            finished.set()


# ----------------------------------------------------------------------------- PostgreSQL


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise EvalError("psycopg is not installed: pip install 'psycopg[binary]==3.2.10' (or pip install -e .)") from None
    return psycopg


def check_dsn(dsn: str) -> dict:
    """The parsed libpq connection string / URI, or one line naming the problem."""
    psycopg = _psycopg()
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:  # the text may hold a password: not echoed
        raise EvalError(f"--dsn is not a libpq connection string or postgresql:// URI ({first_line(e)}): "
                        "e.g. 'host=HOST port=5432 user=USER' or postgresql://USER@HOST:5432") from None


def _shown(dsn: str) -> str:
    """`dsn` for messages, without its password."""
    parts = check_dsn(dsn)
    return " ".join(f"{k}={v}" for k, v in parts.items() if k != "password")


def _connect(dsn: str, db_name: str | None = None, **kw):
    psycopg = _psycopg()
    conninfo = psycopg.conninfo.make_conninfo(dsn, **({"dbname": db_name} if db_name else {}))
    try:
        return psycopg.connect(conninfo, connect_timeout=10, **kw)
    except psycopg.OperationalError as e:
        where = f"database {db_name!r} on " if db_name else ""
        raise EvalError(f"cannot connect to {where}the PostgreSQL server at '{_shown(dsn)}' ({first_line(e)}): "
                        "check --dsn, "
                        "and that the server runs and has the defog-data databases (--restore creates them)") from None


class PostgresEngine:
    """Runs queries on the server at `dsn`, in database `db_name` (as sql-eval: one database per
    defog-data database). One connection per database, each query its own read-only transaction."""

    db_type = "postgres"

    def __init__(self, dsn: str, *, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = MAX_RESULT_BYTES):
        check_dsn(dsn)
        self.dsn = dsn
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._conns: dict[str, Any] = {}

    def _conn(self, db_name: str):
        conn = self._conns.get(db_name)
        if conn is None or conn.closed:
            conn = _connect(self.dsn, db_name)
            conn.read_only = True  # every transaction: BEGIN READ ONLY
            self._conns[db_name] = conn
        return conn

    def run(self, db_name: str, query: str, timeout: float) -> Table:
        psycopg = _psycopg()
        conn = self._conn(db_name)
        deadline = time.monotonic() + timeout
        try:
            with _watchdog(timeout + WATCHDOG_GRACE_S, conn.cancel_safe) as fired:
                try:
                    conn.execute("SELECT set_config('statement_timeout', %s, true)", [str(int(timeout * 1000))])
                    # a server-side cursor: DECLARE ... CURSOR FOR <one query>, sent with parameters
                    # (the extended protocol), so a second statement after a ';' is a syntax error;
                    # with parameters psycopg reads '%' as a placeholder, '%%' as a '%'
                    with conn.cursor(name="sc_eval") as cur:
                        cur.execute(query.replace("%", "%%"), [])
                        return _fetch(cur, self.max_rows, self.max_bytes, deadline)
                except psycopg.errors.QueryCanceled as e:
                    raise QueryTimeout(f"cancelled after {timeout:g} s ({first_line(e)})") from None
                except psycopg.Error as e:
                    if fired:
                        raise QueryTimeout(f"cancelled by the watchdog after {timeout:g} s") from None
                    raise QueryError(first_line(e)) from None
        finally:
            self._end(db_name, conn)

    def _end(self, db_name: str, conn) -> None:
        try:
            conn.rollback()  # never commit
        except Exception:  # noqa: BLE001 - a broken connection is replaced on the next query
            conn.close()
            self._conns.pop(db_name, None)

    def describe_role(self, db_name: str) -> str | None:
        """A warning when the role can write (superuser, or INSERT/UPDATE/DELETE on a table)."""
        row = self._conn(db_name).execute(
            "SELECT current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), "
            "EXISTS (SELECT 1 FROM pg_tables t WHERE t.schemaname NOT IN ('pg_catalog', 'information_schema') AND "
            "has_table_privilege(quote_ident(t.schemaname) || '.' || quote_ident(t.tablename), "
            "'INSERT,UPDATE,DELETE,TRUNCATE'))").fetchone()
        self._end(db_name, self._conns[db_name])
        user, superuser, writes = row
        if superuser or writes:
            return (f"role {user!r} can {'do anything' if superuser else 'write'} in {db_name!r}: generated SQL still "
                    "runs in read-only transactions, but a role with only SELECT rights is safer (see the README)")
        return None

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def existing_databases(admin_dsn: str) -> set[str]:
    with _connect(admin_dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def restore_database(admin_dsn: str, db_name: str, *, reader: str | None = None, progress: bool = True) -> None:
    """Creates `db_name` from defog-data's dump (as its `psql -f` restore does, without the dump's
    ownership and grants); `reader` gets CONNECT, USAGE and SELECT only. Nobody else may create
    anything in it."""
    from psycopg import sql as q

    dump = parse_dump(db_name)
    if progress:
        print(f"restoring defog-data database {db_name} ...", file=sys.stderr, flush=True)
    with _connect(admin_dsn, autocommit=True) as conn:
        conn.execute(q.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(q.Identifier(db_name)))
        conn.execute(q.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(q.Identifier(db_name)))
        if reader:
            conn.execute(q.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(q.Identifier(db_name), q.Identifier(reader)))
    with _connect(admin_dsn, db_name) as conn:
        for item in dump.items:  # in the dump's order: foreign keys after the rows
            if isinstance(item, str):
                conn.execute(item)
                continue
            with conn.cursor().copy(item.header[:-1]) as cp:
                for line in item.lines:
                    cp.write(line + "\n")
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        if reader:
            conn.execute(q.SQL("GRANT USAGE ON SCHEMA public TO {}").format(q.Identifier(reader)))
            conn.execute(q.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(q.Identifier(reader)))
        conn.commit()


def restore_missing(admin_dsn: str, db_names, *, reader: str | None = None, progress: bool = True) -> list[str]:
    """Restores each of `db_names` the server does not have yet; returns those restored."""
    have = existing_databases(admin_dsn)
    todo = [d for d in sorted(set(db_names)) if d not in have]
    for db_name in todo:
        restore_database(admin_dsn, db_name, reader=reader, progress=progress)
    return todo


def find_pg_bin(explicit: str | None = None) -> str:
    """The directory with initdb, pg_ctl and postgres: `explicit`, or Debian's newest
    /usr/lib/postgresql/<version>/bin, or the PATH's."""
    candidates = [explicit] if explicit else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True)
    if not explicit and shutil.which("initdb"):
        candidates.append(os.path.dirname(shutil.which("initdb")))
    for d in candidates:
        if all(os.access(os.path.join(d, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    where = f"in --pg-bin {explicit}" if explicit else "(looked in /usr/lib/postgresql/*/bin and PATH)"
    raise EvalError(f"PostgreSQL server programs initdb, pg_ctl, postgres not found {where}: install Debian's "
                    "postgresql (apt-get install postgresql), or give --dsn for your own server, or --engine sqlite")


def _unprivileged_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (initdb refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "daemon"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    raise EvalError("running as root and there is no 'nobody' user to run PostgreSQL as: create one "
                    "(useradd nobody) or run as an ordinary user")


class TemporaryPostgres:
    """A PostgreSQL server of our own: initdb in a private temporary directory, listening only on
    a unix socket there, run as an unprivileged user (``nobody`` when we are root). Restores the
    defog-data databases asked for, with a SELECT-only role for the queries. Removed on close."""

    def __init__(self, bin_dir: str | None = None, *, progress: bool = True):
        self.bin_dir = find_pg_bin(bin_dir)
        self.progress = progress
        self.root: str | None = None
        self.started = False

    @property
    def socket_dir(self) -> str:
        return os.path.join(self.root, "socket")

    @property
    def admin_dsn(self) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname=postgres"

    @property
    def reader_dsn(self) -> str:
        return f"host={self.socket_dir} port=5432 user={READER_ROLE} dbname=postgres"

    def _run(self, *args: str) -> None:
        owner = _unprivileged_user()
        kw = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
        proc = subprocess.run([os.path.join(self.bin_dir, args[0]), *args[1:]], capture_output=True, text=True,
                              cwd=self.root, env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}, **kw)
        if proc.returncode != 0:
            log = os.path.join(self.root, "server.log")
            tail = open(log, encoding="utf-8", errors="replace").read()[-1500:] if os.path.exists(log) else ""
            raise EvalError(f"{args[0]} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}"
                            + (f"\nserver log: {tail}" if tail else ""))

    def start(self) -> TemporaryPostgres:
        t0 = time.monotonic()
        owner = _unprivileged_user()
        # the server's user must reach its directory: $TMPDIR may sit under root's home
        self.root = tempfile.mkdtemp(prefix="sc-jax-postgres-", dir="/tmp" if owner else None)
        os.makedirs(self.socket_dir)
        if owner:
            for path in (self.root, self.socket_dir):
                os.chown(path, *owner)
        data = os.path.join(self.root, "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
        options = (f"-k {self.socket_dir} -c listen_addresses='' -p 5432 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=20 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", data, "-l", os.path.join(self.root, "server.log"), "-w", "-t", "60", "-o", options,
                  "start")
        self.started = True
        with _connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {READER_ROLE} LOGIN NOINHERIT")
            conn.execute(f"ALTER ROLE {READER_ROLE} SET default_transaction_read_only = on")
            conn.execute("REVOKE ALL ON DATABASE postgres FROM PUBLIC")
        if self.progress:
            print(f"started a temporary PostgreSQL server ({self.bin_dir}) in {self.root} "
                  f"({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        return self

    def restore(self, db_names) -> list[str]:
        return restore_missing(self.admin_dsn, db_names, reader=READER_ROLE, progress=self.progress)

    def close(self) -> None:
        if self.root is None:
            return
        try:
            if self.started:
                self._run("pg_ctl", "-D", os.path.join(self.root, "data"), "-m", "immediate", "-w", "stop")
        finally:
            self.started = False
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> TemporaryPostgres:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- SQLite

#: PostgreSQL column types of the defog-data dumps -> SQLite type affinity, value conversion
_SQLITE_TYPES = (
    (("bigint", "integer", "smallint", "int"), "INTEGER", int),
    (("real", "double precision", "numeric", "float"), "REAL", float),
    (("boolean",), "INTEGER", lambda v: int(v in ("t", "true"))),
)

#: what the authorizer lets a query do: read tables, call functions, recurse in a CTE
_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _sqlite_type(pg_type: str):
    base = pg_type.split(" DEFAULT")[0].replace("NOT NULL", "").strip().lower()
    for names, affinity, convert in _SQLITE_TYPES:
        if base in names:
            return affinity, convert
    return "TEXT", str  # text, date, time: as PostgreSQL prints them


def build_sqlite(db_name: str, path: str) -> None:
    """A SQLite copy of defog-data's `db_name` at `path` (tables and rows of its PostgreSQL dump)."""
    dump = parse_dump(db_name)
    with atomic_file(path, force=True) as tmp:
        _fill_sqlite(tmp, dump)


def _fill_sqlite(tmp: str, dump) -> None:
    conn = sqlite3.connect(tmp)
    try:
        for table, columns in dump.tables.items():
            cols = ", ".join(f'"{name}" {_sqlite_type(typ)[0]}' for name, typ in columns)
            conn.execute(f'CREATE TABLE "{table}" ({cols})')
        for copy in dump.copies:
            types = dict(dump.tables[copy.table])
            converters = [_sqlite_type(types[c])[1] for c in copy.columns]
            rows = [[None if v is None else conv(v) for conv, v in zip(converters, copy_fields(line))]
                    for line in copy.lines]
            names = ", ".join(f'"{c}"' for c in copy.columns)
            marks = ", ".join("?" for _ in copy.columns)
            conn.executemany(f'INSERT INTO "{copy.table}" ({names}) VALUES ({marks})', rows)
        conn.commit()
    finally:
        conn.close()


def sqlite_path(db_dir: str, db_name: str) -> str | None:
    for ext in ("sqlite", "db"):
        path = os.path.join(db_dir, f"{db_name}.{ext}")
        if os.path.isfile(path):
            return path
    return None


class SqliteEngine:
    """Runs queries on ``<db_dir>/<db_name>.sqlite`` (or ``.db``, sql-eval's SQLite layout), opened
    read-only, with an authorizer that allows reading only."""

    db_type = "sqlite"

    def __init__(self, db_dir: str, *, max_rows: int = DEFAULT_MAX_ROWS, max_bytes: int = MAX_RESULT_BYTES):
        self.db_dir = db_dir
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._conns: dict[str, sqlite3.Connection] = {}

    def _conn(self, db_name: str) -> sqlite3.Connection:
        conn = self._conns.get(db_name)
        if conn is None:
            path = sqlite_path(self.db_dir, db_name)
            if path is None:
                raise EvalError(f"no SQLite database {db_name}.sqlite or {db_name}.db in {self.db_dir}: leave "
                                "--sqlite-dir out to build them from defog-data")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _SQLITE_READ_ACTIONS
                                else sqlite3.SQLITE_DENY)
            self._conns[db_name] = conn
        return conn

    def run(self, db_name: str, query: str, timeout: float) -> Table:
        conn = self._conn(db_name)
        deadline = time.monotonic() + timeout
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        try:
            with _watchdog(timeout + WATCHDOG_GRACE_S, conn.interrupt):
                cur = conn.execute(query)
                return _fetch(cur, self.max_rows, self.max_bytes, deadline)
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                raise QueryTimeout(f"interrupted after {timeout:g} s") from None
            raise QueryError(first_line(e)) from None
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as e:
            raise QueryError(first_line(e)) from None
        finally:
            conn.set_progress_handler(None, 0)
            conn.rollback()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def build_sqlite_dir(db_names, db_dir: str, *, progress: bool = True) -> None:
    """SQLite copies of the defog-data databases `db_names` in `db_dir` (those missing there)."""
    os.makedirs(db_dir, exist_ok=True)
    for db_name in sorted(set(db_names)):
        if sqlite_path(db_dir, db_name) is None:
            if progress:
                print(f"building SQLite copy of defog-data database {db_name} ...", file=sys.stderr, flush=True)
            build_sqlite(db_name, os.path.join(db_dir, f"{db_name}.sqlite"))
