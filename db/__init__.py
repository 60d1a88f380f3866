"""Catalogue and registry storage: schema, engine, sessions, migrations. Imports nothing from xray_core."""

from db.engine import dispose_engines, get_engine, in_blocks, make_engine, session_scope, upgrade_to_head

__all__ = ["dispose_engines", "get_engine", "in_blocks", "make_engine", "session_scope", "upgrade_to_head"]
