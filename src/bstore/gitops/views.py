"""JSON views the daemon serves: values made JSON-ready, a profile's generations.

Pure readers: nothing here changes state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def to_jsonable(value: Any) -> Any:
    """A JSON-ready form of a status/result value: ``to_dict()``, dataclass, or as is."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    for method in ("to_dict", "to_json"):
        convert = getattr(value, method, None)
        if callable(convert):
            converted = convert()
            if not isinstance(converted, str):  # to_json() may also mean "a JSON string"
                return to_jsonable(converted)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and type(value).__module__ != "builtins":  # enums
        return to_jsonable(value.value)
    return str(value)



def iso(t: float | None) -> str | None:
    """Unix time as ISO 8601 UTC (seconds), ``None`` for ``None``."""
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def app_records(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-app records of a status document, each with ``name``, sorted by name."""
    apps = status.get("apps") or []
    if isinstance(apps, Mapping):
        return [{"name": name, **(dict(rec) if isinstance(rec, Mapping) else
                                  {"status": rec})} for name, rec in sorted(apps.items())]
    return [dict(rec) for rec in apps if isinstance(rec, Mapping)]


def generation_rows(root: Path, profile_name: str) -> list[dict[str, Any]]:
    """The profile's generations (number, date, current, store path, commit, apps);
    empty when there is no store yet. A damaged generation shows its error."""
    from bstore.generations.listing import generation_rows as rows_of
    from bstore.generations.profiles import Profile
    from bstore.store.layout import StoreLayout
    from bstore.store.local import LocalStore

    if not StoreLayout(root).db_path.exists():
        return []
    with LocalStore.open(root, create=False) as store:
        return rows_of(store, Profile(store, profile_name))
