"""What ``xray status`` reports: catalogue, feature cache coverage, registry and settings."""

from __future__ import annotations

from typing import Any

from xray_core.catalogue import catalogue_summary
from xray_core.settings import Settings


def status_report(settings: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {"home": str(settings.home), "database_url": _safe_url(settings.database_url)}
    report["catalogue"] = catalogue_summary(settings)
    report["feature_cache"] = _feature_cache(settings)
    report["models"] = _models(settings)
    report["settings"] = settings.public_dict()
    report["settings"]["database_url"] = _safe_url(settings.database_url)
    return report


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _feature_cache(settings: Settings) -> list[dict[str, Any]]:
    try:
        from xray_core.features import cache_summary
    except ImportError:  # pragma: no cover - features module always ships
        return []
    return cache_summary(settings.features_dir)


def _models(settings: Settings) -> dict[str, Any]:
    try:
        from xray_core.registry import registry_summary
    except ImportError:
        return {}
    return registry_summary(settings)
