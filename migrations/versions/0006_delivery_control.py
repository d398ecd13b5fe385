"""Delivery control: destination policies and their shared limits, suppressions, rules

Revision ID: 0006
Revises: 0005

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():

    op.create_table('connection_slots',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key', 'slot', name=op.f('pk_connection_slots'))
    )
    with op.batch_alter_table('connection_slots', schema=None) as batch_op:
        batch_op.create_index('ix_connection_slots_owner', ['owner'], unique=False)

    op.create_table('delivery_policies',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('pattern', sa.String(length=253), nullable=False),
    sa.Column('max_connections', sa.Integer(), nullable=True),
    sa.Column('messages_per_connection', sa.Integer(), nullable=True),
    sa.Column('messages_per_minute', sa.Integer(), nullable=True),
    sa.Column('messages_per_hour', sa.Integer(), nullable=True),
    sa.Column('require_tls', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('default', 'domain', 'mx')", name=op.f('ck_delivery_policies_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_policies')),
    sa.UniqueConstraint('kind', 'pattern', name='uq_delivery_policies_kind_pattern')
    )
    op.create_table('destination_backoff',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('level', sa.Integer(), nullable=False),
    sa.Column('pause_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_throttled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_reply', sa.Text(), nullable=False),
    sa.Column('throttles', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_destination_backoff'))
    )
    op.create_table('rate_counters',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('window', sa.String(length=8), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'window', 'window_start', name=op.f('pk_rate_counters'))
    )
    with op.batch_alter_table('rate_counters', schema=None) as batch_op:
        batch_op.create_index('ix_rate_counters_window_start', ['window_start'], unique=False)

    op.create_table('rules',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sender', sa.String(length=320), nullable=True),
    sa.Column('recipient', sa.String(length=320), nullable=True),
    sa.Column('domain', sa.String(length=253), nullable=True),
    sa.Column('action', sa.String(length=8), nullable=False),
    sa.Column('comment', sa.String(length=500), nullable=False),
    sa.Column('created_by', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queued_matches', sa.Integer(), nullable=False),
    sa.Column('hits', sa.Integer(), nullable=False),
    sa.CheckConstraint("action IN ('hold', 'defer', 'bounce')", name=op.f('ck_rules_action')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rules'))
    )
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.create_index('ix_rules_expires', ['expires_at'], unique=False)

    op.create_table('suppressions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('enhanced_code', sa.String(length=16), nullable=True),
    sa.Column('message_id', sa.String(length=64), nullable=True),
    sa.Column('created_by', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("source IN ('bounce', 'operator', 'import')", name=op.f('ck_suppressions_source')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppressions')),
    sa.UniqueConstraint('address', name=op.f('uq_suppressions_address'))
    )
    with op.batch_alter_table('suppressions', schema=None) as batch_op:
        batch_op.create_index('ix_suppressions_created', ['created_at', 'id'], unique=False)




def downgrade():

    with op.batch_alter_table('suppressions', schema=None) as batch_op:
        batch_op.drop_index('ix_suppressions_created')

    op.drop_table('suppressions')
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.drop_index('ix_rules_expires')

    op.drop_table('rules')
    with op.batch_alter_table('rate_counters', schema=None) as batch_op:
        batch_op.drop_index('ix_rate_counters_window_start')

    op.drop_table('rate_counters')
    op.drop_table('destination_backoff')
    op.drop_table('delivery_policies')
    with op.batch_alter_table('connection_slots', schema=None) as batch_op:
        batch_op.drop_index('ix_connection_slots_owner')

    op.drop_table('connection_slots')

