"""calls with an unknown outcome: rotation_run.requeues, issue_unknown_since; provider_key_sighting

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rotation_run", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requeues", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("issue_unknown_since", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "provider_key_sighting",
        sa.Column("provider", sa.String(length=128), nullable=False),
        sa.Column("provider_key_id", sa.String(length=200), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("provider", "provider_key_id"),
    )


def downgrade() -> None:
    op.drop_table("provider_key_sighting")
    with op.batch_alter_table("rotation_run", schema=None) as batch_op:
        batch_op.drop_column("issue_unknown_since")
        batch_op.drop_column("requeues")
