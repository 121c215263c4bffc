"""Persistence for the gateway: the only package that holds SQL (SQLAlchemy Core, Alembic migrations)."""
