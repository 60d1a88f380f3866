"""drift checks: one row per batch drift check against a model's reference (issue 14)

A new table only; existing tables and rows are untouched.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 20:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('drift_checks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('ood_flagged', sa.Integer(), nullable=False),
    sa.Column('drift', sa.Boolean(), nullable=False),
    sa.Column('verdict', sa.Text(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('drift_checks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_drift_checks_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_drift_checks_model_id'), ['model_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('drift_checks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_drift_checks_model_id'))
        batch_op.drop_index(batch_op.f('ix_drift_checks_created_at'))
    op.drop_table('drift_checks')
