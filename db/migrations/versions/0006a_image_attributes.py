"""image attributes: a manifest's own columns, kept per film as exported

``images.attributes`` (JSON, NULL when a film has none) holds the columns of a manifest that are not
known names (licence, source path, an original finding, ...), which ingest used to refuse (issue 25).
``images.attribute_set`` (a 16-hex-digit hash of the sorted names, indexed) lets ``xray status`` count
films per attribute name from the index. Both are nullable columns added in place (ALTER TABLE on SQLite
and PostgreSQL, no copy of the table): existing rows keep NULL (no attributes) and their ids.

Revision ID: 0006a
Revises: 0005
Create Date: 2026-12-02 10:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006a'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('images', sa.Column('attributes', sa.JSON(none_as_null=True), nullable=True))
    op.add_column('images', sa.Column('attribute_set', sa.String(length=16), nullable=True))
    op.create_index(op.f('ix_images_attribute_set'), 'images', ['attribute_set'], unique=False)


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy of ``images``: copying the
    # table would drop it while near_pairs' foreign keys point at it.
    op.drop_index(op.f('ix_images_attribute_set'), table_name='images')
    op.drop_column('images', 'attribute_set')
    op.drop_column('images', 'attributes')
