"""per-key notice settings: managed_key.contact and .assisted, inventory_snapshot.settings

A notice for one key (deposit requested, revoke requested, a run's events) read and parsed the
whole applied inventory document to find that key's contact and timings and the notification
sinks. ``config apply`` now copies them to the key's row and to the snapshot's small
``settings``; this fills them in from the newest snapshot already applied.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
import json

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("managed_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("contact", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("assisted", sa.JSON(), nullable=True))
    with op.batch_alter_table("inventory_snapshot", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings", sa.JSON(), nullable=True))
    _backfill(op.get_bind())


def _backfill(conn: sa.Connection) -> None:
    row = conn.execute(sa.text("SELECT id, document FROM inventory_snapshot ORDER BY id DESC LIMIT 1")).first()
    if row is None:
        return
    document = json.loads(row[1]) if isinstance(row[1], str) else (row[1] or {})
    settings = {section: document.get(section) for section in ("notifications", "owner_delivery")}
    snapshot = sa.table("inventory_snapshot", sa.column("id"), sa.column("settings", sa.JSON()))
    conn.execute(snapshot.update().where(snapshot.c.id == row[0]).values(settings=settings))
    key = sa.table("managed_key", sa.column("name"), sa.column("contact", sa.JSON()), sa.column("assisted", sa.JSON()))
    rows = [{"key_name": name, "contact": declared.get("contact"), "assisted": declared.get("assisted")}
            for name, declared in (document.get("keys") or {}).items() if isinstance(declared, dict)]
    if rows:
        conn.execute(key.update().where(key.c.name == sa.bindparam("key_name"))
                     .values(contact=sa.bindparam("contact", type_=sa.JSON()), assisted=sa.bindparam("assisted", type_=sa.JSON())), rows)


def downgrade() -> None:
    with op.batch_alter_table("inventory_snapshot", schema=None) as batch_op:
        batch_op.drop_column("settings")
    with op.batch_alter_table("managed_key", schema=None) as batch_op:
        batch_op.drop_column("assisted")
        batch_op.drop_column("contact")
