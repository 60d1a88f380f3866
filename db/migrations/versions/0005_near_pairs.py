"""near pairs: images of different patients within 6 pHash bits, recorded once instead of scanned

``xray status`` listed near-duplicate films across splits by comparing every pair of pHashes, which
took 146 s at 100,000 images and grows with the square. Ingest now records each new film's near
pairs (found by multi-index hashing, :mod:`db.near_pairs`) in ``near_pairs``; status joins them to
the patients' splits. This migration backfills the table for the images already catalogued (the same
band method, all pairs at once: about 20 s per million images on random hashes), and
adds two covering indexes on ``images`` for status's counts (see ``census`` in the catalogue).

Revision ID: 0005
Revises: 0003s
Create Date: 2026-11-30 22:30:00
"""
import sqlalchemy as sa
from alembic import op

from db.near_pairs import backfill_near_pairs

revision = '0005'
down_revision = '0003s'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('near_pairs',
    sa.Column('image_a', sa.Integer(), nullable=False),
    sa.Column('image_b', sa.Integer(), nullable=False),
    sa.Column('distance', sa.Integer(), nullable=False),
    sa.CheckConstraint('image_a < image_b', name='ck_near_pair_order'),
    sa.ForeignKeyConstraint(['image_a'], ['images.id'], ),
    sa.ForeignKeyConstraint(['image_b'], ['images.id'], ),
    sa.PrimaryKeyConstraint('image_a', 'image_b')
    )
    op.create_index(op.f('ix_near_pairs_image_b'), 'near_pairs', ['image_b'], unique=False)
    backfill_near_pairs(op.get_bind())
    # xray status at 1M images: its census reads this index alone, grouped in its order (no sort of
    # 1M rows), and label history groups films by (patient, label) from the second.
    op.create_index('ix_images_census', 'images',
                    ['label', 'site', 'source_id', 'view', 'format', 'body_part', 'patient_id'], unique=False)
    op.create_index('ix_images_patient_label', 'images', ['patient_id', 'label'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_images_patient_label', table_name='images')
    op.drop_index('ix_images_census', table_name='images')
    op.drop_index(op.f('ix_near_pairs_image_b'), table_name='near_pairs')
    op.drop_table('near_pairs')
