"""inventory snapshot: the inventory document as applied

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inventory_snapshot",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("applied_by", sa.String(length=200), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=True),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("inventory_snapshot", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inventory_snapshot_applied_at"), ["applied_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_inventory_snapshot_digest"), ["digest"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("inventory_snapshot", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inventory_snapshot_digest"))
        batch_op.drop_index(batch_op.f("ix_inventory_snapshot_applied_at"))
    op.drop_table("inventory_snapshot")
