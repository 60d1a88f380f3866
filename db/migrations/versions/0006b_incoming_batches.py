"""incoming batches: each batch folder of XRAY_INCOMING a retrain took, by name and content digest

``INCOMING/<batch>/`` is one arrival (issue 25): a retrain takes a batch once, when it is complete, and
records it here, so the next run leaves it alone unless it changed (another digest: a new arrival).
A new table only; existing tables and rows are untouched.

Revision ID: 0006b
Revises: 0005
Create Date: 2026-12-02 10:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006b'
down_revision = '0006a'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('incoming_batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('folder', sa.Text(), nullable=False),
    sa.Column('layout', sa.String(length=16), nullable=False),
    sa.Column('taken_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('files', sa.Integer(), nullable=False),
    sa.Column('added', sa.Integer(), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('quarantined', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=True),
    sa.Column('source_id', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('uq_incoming_batches_name_digest', 'incoming_batches', ['name', 'digest'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_incoming_batches_name_digest', table_name='incoming_batches')
    op.drop_table('incoming_batches')
