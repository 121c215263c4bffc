"""A fresh gateway database per test, on SQLite and (where .ci/run started one) on PostgreSQL."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from thinkgate.storage.db import Database

BACKENDS = ["sqlite", "postgres"]


def fresh_database(kind: str, tmp_path) -> Database:
    if kind == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'gateway.db'}")
    else:
        url = os.environ.get("THINKGATE_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("THINKGATE_TEST_POSTGRES_URL is not set: .ci/run starts a private PostgreSQL")
        db = Database(url)
        with db.engine.begin() as c:  # start from nothing: earlier tests share the cluster
            c.execute(sa.text("DROP SCHEMA public CASCADE"))
            c.execute(sa.text("CREATE SCHEMA public"))
    db.upgrade()
    return db
