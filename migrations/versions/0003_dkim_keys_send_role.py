"""DKIM signing keys; API keys get the ``send`` role

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "dkim_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("selector", sa.String(length=63), nullable=False),
        sa.Column("algorithm", sa.String(length=8), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("private_key", sa.Text(), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("algorithm IN ('rsa', 'ed25519')",
                           name=op.f("ck_dkim_keys_algorithm")),
        sa.CheckConstraint("state IN ('active', 'standby', 'retired')",
                           name=op.f("ck_dkim_keys_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dkim_keys")),
        sa.UniqueConstraint("domain", "selector", name=op.f("uq_dkim_keys_domain_selector")),
    )
    op.create_index("ix_dkim_keys_domain_state", "dkim_keys", ["domain", "state"], unique=False)
    op.create_index("uq_dkim_keys_active", "dkim_keys", ["domain", "algorithm"], unique=True,
                    sqlite_where=sa.text("state = 'active'"),
                    postgresql_where=sa.text("state = 'active'"))
    # SQLite cannot alter a CHECK constraint: batch mode rebuilds the table.
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_constraint(op.f("ck_api_keys_role"), type_="check")
        batch_op.create_check_constraint(op.f("ck_api_keys_role"), "role IN ('read', 'send', 'admin')")


def downgrade():
    op.execute("UPDATE api_keys SET revoked = true WHERE role = 'send'")
    op.execute("UPDATE api_keys SET role = 'read' WHERE role = 'send'")
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_constraint(op.f("ck_api_keys_role"), type_="check")
        batch_op.create_check_constraint(op.f("ck_api_keys_role"), "role IN ('read', 'admin')")
    op.drop_index("uq_dkim_keys_active", table_name="dkim_keys")
    op.drop_index("ix_dkim_keys_domain_state", table_name="dkim_keys")
    op.drop_table("dkim_keys")
