"""The settings a run was given, as a screen says them: every ``XRAY_*`` variable whose value differs
from its default (the demo's settings line, where the lowered floors must show)."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from xray_core.settings import ENV_BY_FIELD, FIELDS, Settings


def changed_settings(settings: Settings) -> dict[str, str]:
    """``XRAY_*`` variable -> value of every setting that differs from its default, in declaration order:
    what a run was told, for a screen or a report to say (the demo's settings line).

    A default derived from other settings (the database under ``XRAY_HOME``, the allowed roots beside
    ``XRAY_INCOMING``) is derived from ``settings``' own values, so only what was set is named. Values
    are shown as :meth:`Settings.public_dict` shows them (the patient salt and storage credentials
    masked), lists comma-separated as the variables take them.
    """
    shown, data = settings.public_dict(), dict(settings)
    out: dict[str, str] = {}
    for name, env in ENV_BY_FIELD.items():
        default = FIELDS[name].get_default(call_default_factory=True, validated_data=data)
        try:
            default = field_type(name).validate_python(default)
        except ValidationError:
            pass  # compared as declared: a default that does not validate on its own differs anyway
        if default == getattr(settings, name):
            continue
        value = shown[name]
        out[env] = (",".join(str(v) for v in value) if isinstance(value, list)
                    else str(value).lower() if isinstance(value, bool) else str(value))
    return out


@functools.cache
def field_type(name: str) -> TypeAdapter[Any]:
    """A validator of one setting's values on their own (its type and checks, as the model applies them)."""
    field = FIELDS[name]
    declared: Any = field.annotation  # a type form; pydantic's own annotation says Optional
    return TypeAdapter(Annotated[(declared, *field.metadata)] if field.metadata else declared)
