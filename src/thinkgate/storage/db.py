"""Connections and migrations: SQLite by default (a file under the user's data directory, WAL mode), or
PostgreSQL by URL (`postgresql+psycopg://...`), which several gateway processes may share."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 7_316_451  # pg_advisory_xact_lock key: one process migrates at a time


def data_dir() -> Path:
    """Where the default database lives: $THINKGATE_DATA_DIR, else $XDG_DATA_HOME/thinkgate, else ~/.local/share."""
    if os.environ.get("THINKGATE_DATA_DIR"):
        return Path(os.environ["THINKGATE_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "thinkgate"


def default_url() -> str:
    return f"sqlite:///{data_dir() / 'thinkgate.db'}"


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)


class Database:
    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        u = sa.engine.make_url(self.url)
        self.is_sqlite = u.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_write_transactions(self.engine)
        else:
            self.engine = sa.create_engine(self.url, pool_size=16, max_overflow=16, pool_pre_ping=True)

    @contextmanager
    def begin(self):
        """A transaction. On SQLite it takes the write lock at BEGIN (IMMEDIATE), so a read-then-write inside
        it cannot interleave with another writer; on PostgreSQL rows are locked with FOR UPDATE where read."""
        with self.engine.begin() as conn:
            yield conn

    def upgrade(self) -> None:
        """Apply the migrations (idempotent; safe when several processes start at once)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> None:
        """Raise unless the database answers (readiness checks)."""
        with self.engine.connect() as c:
            c.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_write_transactions(engine: sa.Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and cannot take the write lock up front; take over:
    # autocommit at the driver, then BEGIN IMMEDIATE ourselves (SQLAlchemy's documented recipe).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL survives a process kill
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
