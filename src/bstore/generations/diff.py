"""What changed between two generations (``bstore diff``): pure, over two manifests.

Per app: added, removed, upgraded / downgraded (version), rebuilt (same version, other
build: the modules whose ``.beam`` changed, were added or removed), reconfigured (env
keys set or unset), and other changed settings (source, isolation, vm_config, health,
depends_on). Module hashes come from the store's recorded manifests of each output,
copied into the generation manifest when it was made, so no file is read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bstore.generations.manifest import AppEntry, GenerationManifest
from bstore.specs.terms.model import exactly_equal


class Change(StrEnum):
    """The headline change of one app."""

    ADDED = "added"
    REMOVED = "removed"
    UPGRADED = "upgraded"
    DOWNGRADED = "downgraded"
    CHANGED = "changed"  # same version, something else differs
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class AppDiff:
    """How one app differs. ``modules_*`` are module names; ``env_set``/``env_unset`` are
    env key names; ``settings`` names the other fields that differ."""

    name: str
    change: Change
    old_version: str | None
    new_version: str | None
    rebuilt: bool = False
    modules_changed: tuple[str, ...] = ()
    modules_added: tuple[str, ...] = ()
    modules_removed: tuple[str, ...] = ()
    env_set: tuple[str, ...] = ()
    env_unset: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()

    @property
    def reconfigured(self) -> bool:
        """Whether env keys were set or unset."""
        return bool(self.env_set or self.env_unset)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "change": self.change.value,
                "old_version": self.old_version, "new_version": self.new_version,
                "rebuilt": self.rebuilt, "reconfigured": self.reconfigured,
                "modules_changed": list(self.modules_changed),
                "modules_added": list(self.modules_added),
                "modules_removed": list(self.modules_removed),
                "env_set": list(self.env_set), "env_unset": list(self.env_unset),
                "settings": list(self.settings)}


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Numbers compare as numbers, words as words; a number sorts after a word, so
    # 1.0.0-rc1 < 1.0.0.1 and 1.10 > 1.9 (good enough to name the direction).
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"[.+_\-]", version))


def _app_diff(old: AppEntry, new: AppEntry) -> AppDiff:
    rebuilt = old.output != new.output and old.mcid != new.mcid
    changed = tuple(sorted(m for m in new.modules
                           if m in old.modules and old.modules[m] != new.modules[m]))
    added = tuple(sorted(set(new.modules) - set(old.modules)))
    removed = tuple(sorted(set(old.modules) - set(new.modules)))
    env_set = tuple(sorted(k.name for k, v in new.env.items()
                           if k not in old.env or not exactly_equal(old.env[k], v)))
    env_unset = tuple(sorted(k.name for k in old.env if k not in new.env))
    settings = tuple(name for name, differs in (
        ("source", not old.source.same_spec(new.source)),
        ("isolation", old.isolation is not new.isolation),
        ("vm_config", old.vm_config != new.vm_config),
        ("health", old.health != new.health),
        ("depends_on", old.depends_on != new.depends_on),
        ("dependencies", set(old.closure) - {old.output} != set(new.closure) - {new.output}),
    ) if differs)
    if old.version != new.version:
        change = (Change.DOWNGRADED if _version_key(new.version) < _version_key(old.version)
                  else Change.UPGRADED)
    elif rebuilt or env_set or env_unset or settings:
        change = Change.CHANGED
    else:
        change = Change.UNCHANGED
    return AppDiff(new.name, change, old.version, new.version, rebuilt, changed, added,
                   removed, env_set, env_unset, settings)


def diff_generations(old: GenerationManifest, new: GenerationManifest) -> list[AppDiff]:
    """One :class:`AppDiff` per app of either generation, sorted by name."""
    out = []
    for name in sorted(set(old.apps) | set(new.apps)):
        a, b = old.apps.get(name), new.apps.get(name)
        if a is None:
            assert b is not None
            out.append(AppDiff(name, Change.ADDED, None, b.version,
                               modules_added=tuple(b.modules)))
        elif b is None:
            out.append(AppDiff(name, Change.REMOVED, a.version, None,
                               modules_removed=tuple(a.modules)))
        else:
            out.append(_app_diff(a, b))
    return out


def render_diff(diffs: list[AppDiff], old_label: str, new_label: str) -> str:
    """Human lines: a headline per changed app, details indented below it."""
    lines = [f"generation {old_label} -> {new_label}:"]
    shown = [d for d in diffs if d.change is not Change.UNCHANGED]
    if not shown:
        lines.append("  no app changed")
    for d in shown:
        if d.change in (Change.UPGRADED, Change.DOWNGRADED):
            head = f"{d.change.value} {d.name} {d.old_version} -> {d.new_version}"
        elif d.change is Change.ADDED:
            head = f"added {d.name} {d.new_version}"
        elif d.change is Change.REMOVED:
            head = f"removed {d.name} {d.old_version}"
        else:
            kinds = (["rebuilt"] if d.rebuilt else []) + (
                ["reconfigured"] if d.reconfigured else [])
            head = f"{'/'.join(kinds) or 'changed'} {d.name} {d.new_version}"
        lines.append(f"  {head}")
        if d.change in (Change.ADDED, Change.REMOVED):
            continue
        for label, names in (("modules changed", d.modules_changed),
                             ("modules added", d.modules_added),
                             ("modules removed", d.modules_removed),
                             ("env set", d.env_set), ("env unset", d.env_unset),
                             ("settings changed", d.settings)):
            if names:
                lines.append(f"    {label}: {', '.join(names)}")
    return "\n".join(lines)
