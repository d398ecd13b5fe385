"""Queue shape: counts of queued mail per queue state, domain and arrival minute

Revision ID: 0008
Revises: 0007

The counts start empty and are filled from the queue as it stands (the same computation as
``queue.shape.rebuild``), so an upgrade of a database with queued mail shows it at once.
"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('queue_shape_counts',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('domain', sa.String(length=320), nullable=False),
    sa.Column('minute', sa.BigInteger(), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'state', 'domain', 'minute', name=op.f('pk_queue_shape_counts'))
    )
    op.create_table('queue_shape_deltas',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('domain', sa.String(length=320), nullable=False),
    sa.Column('minute', sa.BigInteger(), nullable=False),
    sa.Column('delta', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_shape_deltas'))
    )
    # The queue as it stands, as deltas (folded by the first fold or read); the SQL of
    # app/queue/shape.py (epoch_minute, sender_domain_sql), written out: a migration does not
    # import the application.
    if op.get_bind().dialect.name == "postgresql":
        minute = "CAST(floor(extract(epoch FROM m.created_at) / 60) AS BIGINT)"
        domain = ("translate(substr(m.sender, length(rtrim(m.sender, replace(m.sender, '@', "
                  "''))) + 1), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')")
    else:
        minute = "(CAST(strftime('%s', substr(m.created_at, 1, 19)) AS INTEGER) / 60)"
        domain = ("lower(substr(m.sender, length(rtrim(m.sender, replace(m.sender, '@', ''))) "
                  "+ 1))")
    op.execute(f"""
        INSERT INTO queue_shape_deltas (kind, state, domain, minute, delta)
        SELECT 'domain', m.queue_state, r.domain, {minute}, count(*)
        FROM messages AS m JOIN recipients AS r ON r.message_id = m.id
        WHERE r.status <> 'delivered'
        GROUP BY m.queue_state, r.domain, {minute}
        UNION ALL
        SELECT 'sender_domain', m.queue_state, {domain}, {minute}, count(*)
        FROM messages AS m
        GROUP BY m.queue_state, {domain}, {minute}
    """)


def downgrade():
    op.drop_table('queue_shape_deltas')
    op.drop_table('queue_shape_counts')
