"""A profile's generations as rows for people and for the API."""

from __future__ import annotations

from typing import Any

from bstore.errors import BstoreError
from bstore.generations.generation import load_generation
from bstore.generations.profiles import Profile
from bstore.store.local import LocalStore


def generation_rows(store: LocalStore, profile: Profile) -> list[dict[str, Any]]:
    """Number, date, current marker, store path, commit and apps of every generation.

    A damaged generation is listed with its error instead of hiding the others.
    """
    current = profile.current_number()
    rows: list[dict[str, Any]] = []
    for gen in profile.generations():
        row: dict[str, Any] = {
            "number": gen.number, "date": gen.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "current": gen.number == current, "store_path": store.full_path(gen.store_path),
            "commit": None, "apps": [], "error": None}
        try:
            manifest = load_generation(store, gen.store_path)
        except BstoreError as exc:
            row["error"] = exc.message
        else:
            row["commit"] = manifest.commit
            row["apps"] = [{"name": a.name, "version": a.version}
                           for a in manifest.apps.values()]
        rows.append(row)
    return rows
