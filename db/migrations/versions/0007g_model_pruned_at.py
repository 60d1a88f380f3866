"""model retention: ``models.pruned_at``, when ``xray gc`` deleted a version's files

A pruned version keeps its catalogue row, lineage (split manifest), evaluations and audit rows; only its
``models/<version>/`` files go (xray_core.registry.retention). One nullable column added in place
(ALTER TABLE on SQLite and PostgreSQL, no copy of the table): existing rows keep NULL (files kept) and
their ids, status and every other value.

Revision ID: 0007g
Revises: 0006b
Create Date: 2026-12-09 10:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007g'
down_revision = '0006b'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('models', sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy of ``models``: other tables'
    # foreign keys point at it. A pruned version then looks unpruned with missing files (xray doctor says so).
    op.drop_column('models', 'pruned_at')
