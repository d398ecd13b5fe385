"""Insight: failure classes, recipient domain and latency on events, the per-domain rollup

Revision ID: 0007
Revises: 0006

Events recorded before this revision get their class, domain and latency, and the per-domain
rollup its rows, from ``flask stats rebuild`` (docs/STATS.md, "Upgrading to 0007"): the
classifier is Python, and a recount of ten million events belongs in a command an operator
runs when it suits, not in a schema change.
"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('domain_rollup',
    sa.Column('grain', sa.String(length=8), nullable=False),
    sa.Column('start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('failure_class', sa.String(length=16), nullable=False),
    sa.Column('latency_bucket', sa.SmallInteger(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.CheckConstraint("grain IN ('hour', 'day', 'week', 'month')", name=op.f('ck_domain_rollup_grain')),
    sa.PrimaryKeyConstraint('grain', 'start', 'domain', 'outcome', 'failure_class', 'latency_bucket', name=op.f('pk_domain_rollup'))
    )
    with op.batch_alter_table('domain_rollup', schema=None) as batch_op:
        batch_op.create_index('ix_domain_rollup_domain', ['domain', 'grain', 'start'], unique=False)

    with op.batch_alter_table('delivery_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failure_class', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('domain', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('latency', sa.Float(), nullable=True))
        batch_op.create_index('ix_delivery_events_failure_class', ['failure_class', 'id'], unique=False, postgresql_where=sa.text('failure_class IS NOT NULL'), sqlite_where=sa.text('failure_class IS NOT NULL'))
        batch_op.create_index('ix_delivery_events_domain_errors', ['domain', 'id'], unique=False, postgresql_where=sa.text("event_type IN ('tempfail', 'rejection')"), sqlite_where=sa.text("event_type IN ('tempfail', 'rejection')"))


def downgrade():
    with op.batch_alter_table('delivery_events', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_events_domain_errors', postgresql_where=sa.text("event_type IN ('tempfail', 'rejection')"), sqlite_where=sa.text("event_type IN ('tempfail', 'rejection')"))
        batch_op.drop_index('ix_delivery_events_failure_class', postgresql_where=sa.text('failure_class IS NOT NULL'), sqlite_where=sa.text('failure_class IS NOT NULL'))
        batch_op.drop_column('latency')
        batch_op.drop_column('domain')
        batch_op.drop_column('failure_class')

    with op.batch_alter_table('domain_rollup', schema=None) as batch_op:
        batch_op.drop_index('ix_domain_rollup_domain')

    op.drop_table('domain_rollup')
