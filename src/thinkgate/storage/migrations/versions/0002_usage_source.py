"""usage: where token counts come from, and the upstream backend

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch_op:
        batch_op.add_column(sa.Column("usage_source", sa.String(16), nullable=False, server_default="engine"))
        batch_op.add_column(sa.Column("backend", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch_op:
        batch_op.drop_column("backend")
        batch_op.drop_column("usage_source")
