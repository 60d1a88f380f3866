"""sequestered test set: ``patients.split`` may be ``sequestered``; a ``sequester_audits`` table

A share of NEW patients (XRAY_SEQUESTER_FRACTION) is set aside for the monthly audit of the champion
against the locked reference and never enters a routine split. Upgraded in place: every existing
patient keeps its split (none becomes sequestered; only patients assigned after the upgrade can be) and
every row keeps its values. ``patients.split`` widens to VARCHAR(16) and its CHECK allows the new value.

SQLite cannot alter a CHECK, and a batch copy of ``patients`` is refused while ``images`` points at it
(foreign keys are on and cannot be turned off inside the migration's transaction). So on SQLite the
table's stored CREATE statement is rewritten in place, the procedure SQLite documents for changing
constraints that existing rows satisfy (https://www.sqlite.org/lang_altertable.html, "otheralter"):
the new CHECK only allows more, and SQLite does not enforce VARCHAR lengths, so no row is touched.

Revision ID: 0008
Revises: 0007g
Create Date: 2026-12-10 10:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007g'
branch_labels = None
depends_on = None

OLD_CHECK = "split IN ('train','val','test')"
NEW_CHECK = "split IN ('train','val','test','sequestered')"


def _rewrite_sqlite_patients(old: tuple[str, str], new: tuple[str, str]) -> None:
    conn = op.get_bind()
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type='table' AND name='patients'").scalar()
    if sql is None or old[0] not in sql or old[1] not in sql:
        raise RuntimeError(f"patients table is not as expected; not rewriting it: {sql}")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type='table' AND name='patients'",
                             (sql.replace(old[0], new[0]).replace(old[1], new[1]),))
        conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")  # other connections re-read it
    finally:
        conn.exec_driver_sql("PRAGMA writable_schema = OFF")


def _alter_patients(old_check: str, new_check: str, length: int) -> None:
    if op.get_bind().dialect.name == "sqlite":
        old_len, new_len = ("VARCHAR(16)", "VARCHAR(8)") if length == 8 else ("VARCHAR(8)", "VARCHAR(16)")
        _rewrite_sqlite_patients((old_check, "split " + old_len), (new_check, "split " + new_len))
        return
    op.drop_constraint('ck_patient_split', 'patients', type_='check')
    op.alter_column('patients', 'split', type_=sa.String(length=length), existing_nullable=True)
    op.create_check_constraint('ck_patient_split', 'patients', f"split IS NULL OR {new_check}")


def upgrade() -> None:
    _alter_patients(OLD_CHECK, NEW_CHECK, 16)
    op.create_table('sequester_audits',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('champion', sa.Integer(), nullable=True),
    sa.Column('reference', sa.Integer(), nullable=True),
    sa.Column('test_set_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('degraded', sa.Boolean(), nullable=False),
    sa.Column('verdict', sa.Text(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('flow_run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['champion'], ['models.id'], ),
    sa.ForeignKeyConstraint(['reference'], ['models.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_sequester_audits_created_at', 'sequester_audits', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_sequester_audits_created_at', table_name='sequester_audits')
    op.drop_table('sequester_audits')
    # Sequestered patients go back to no split (the next ingest assigns them a routine one).
    op.execute("UPDATE patients SET split = NULL, assigned_at = NULL WHERE split = 'sequestered'")
    _alter_patients(NEW_CHECK, OLD_CHECK, 8)
