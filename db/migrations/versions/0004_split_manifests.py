"""split manifests: a version's training and validation images as one shared, content-addressed value

Replaces ``model_images`` (one row per image per version) with ``split_manifests`` (one row per
distinct set, see :mod:`db.split_manifest`) and ``models.split_manifest``. Existing rows are moved in
place: each version's rows become its manifest (versions with identical sets share one), then the
old table is dropped. Lineage answers (``xray models show N``) are unchanged.

Revision ID: 0003s
Revises: 0002
Create Date: 2026-11-30 20:30:00
"""
import sqlalchemy as sa
from alembic import op

from db.split_manifest import ENCODING, decode, encode

revision = '0003s'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('split_manifests',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('encoding', sa.String(length=32), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_val', sa.Integer(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256')
    )
    # A plain ADD COLUMN ... REFERENCES (SQLite and PostgreSQL both allow it on a NULL column): the
    # models table, with its partial unique index on the champion, is not rebuilt as batch mode would.
    # (Already there after a downgrade on SQLite, which cannot drop it: see downgrade.)
    if 'split_manifest' not in {c['name'] for c in sa.inspect(op.get_bind()).get_columns('models')}:
        op.execute("ALTER TABLE models ADD COLUMN split_manifest VARCHAR(64) REFERENCES "
                   "split_manifests (sha256)")
    op.create_index(op.f('ix_models_split_manifest'), 'models', ['split_manifest'], unique=False)

    bind = op.get_bind()
    by_model: dict[int, dict[str, list[int]]] = {}
    rows = bind.execute(sa.text("SELECT model_id, image_id, role FROM model_images"))
    for model_id, image_id, role in rows:
        by_model.setdefault(model_id, {"train": [], "val": []}).setdefault(role, []).append(image_id)
    written: set[str] = set()
    for model_id, roles in sorted(by_model.items()):
        sha, body, n_train, n_val = encode(roles.get("train", []), roles.get("val", []))
        if sha not in written:
            bind.execute(sa.text("INSERT INTO split_manifests (sha256, encoding, n_train, n_val, body, "
                                 "created_at) VALUES (:sha, :enc, :nt, :nv, :body, CURRENT_TIMESTAMP)"),
                         {"sha": sha, "enc": ENCODING, "nt": n_train, "nv": n_val, "body": body})
            written.add(sha)
        bind.execute(sa.text("UPDATE models SET split_manifest = :sha WHERE id = :id"),
                     {"sha": sha, "id": model_id})
    op.drop_table('model_images')


def downgrade() -> None:
    op.create_table('model_images',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ),
    sa.PrimaryKeyConstraint('model_id', 'image_id')
    )
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT m.id, s.body, s.encoding FROM models m "
                                "JOIN split_manifests s ON s.sha256 = m.split_manifest")).all()
    for model_id, body, encoding in rows:
        for role, ids in decode(body, encoding).items():
            if ids:
                bind.execute(sa.text("INSERT INTO model_images (model_id, image_id, role) "
                                     "VALUES (:m, :i, :r)"),
                             [{"m": model_id, "i": i, "r": role} for i in ids])
    op.drop_index(op.f('ix_models_split_manifest'), table_name='models')
    if bind.dialect.name == 'sqlite':
        # SQLite cannot drop a column with a REFERENCES clause, and rebuilding models (batch mode) is
        # refused by the foreign keys of evaluations and promotions inside this transaction: the
        # column stays, emptied, and upgrade reuses it.
        bind.execute(sa.text("UPDATE models SET split_manifest = NULL"))
    else:
        op.drop_column('models', 'split_manifest')
    op.drop_table('split_manifests')
