"""image acquisition metadata: site, device, sex, age, study, view, laterality, spacing, windowing

Nullable columns on ``images`` (issue 17), filled from DICOM tags or manifest columns for new
images; rows catalogued before this revision keep NULL (unknown). Adding nullable columns is an
in-place ALTER TABLE on SQLite and PostgreSQL: existing rows and ids are untouched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 19:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

COLUMNS = (
    ('site', sa.String(length=64)),
    ('device', sa.String(length=128)),
    ('sex', sa.String(length=1)),
    ('age_years', sa.Float()),
    ('study_hash', sa.String(length=32)),
    ('study_date', sa.Date()),
    ('view_position', sa.String(length=16)),
    ('laterality', sa.String(length=1)),
    ('pixel_spacing', sa.Float()),
    ('body_part', sa.String(length=16)),
    ('modality', sa.String(length=16)),
    ('windowing', sa.String(length=32)),
    ('stored_sha256', sa.String(length=64)),
)


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
        batch_op.create_index(batch_op.f('ix_images_site'), ['site'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_study_hash'), ['study_hash'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_study_hash'))
        batch_op.drop_index(batch_op.f('ix_images_site'))
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
