"""Where a tree's symlinks lead: pure containment checks over link targets.

A store path may hold symlinks, but they must resolve inside the path itself, or — for
paths that reference others, like generations linking ``lib/<app>`` into app outputs —
into one of the store paths it references (which GC then keeps alive). Checking each
link on its own is not enough: ``l -> .`` and ``y -> l/..`` each stay inside, yet ``y``
resolves to the parent of the tree. :func:`find_escaping_link` resolves every link
through the tree's other links, exactly as the kernel would, without touching a disk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping

#: Linux gives up after 40 link hops (ELOOP); a tree needing more is refused.
MAX_LINK_HOPS = 40


def _climbs_out(parts: list[bytes]) -> bool:
    depth = 0
    for part in parts:
        if part in (b"", b"."):
            continue
        depth += -1 if part == b".." else 1
        if depth < 0:
            return True
    return False


def _escape_reason(
    link_path: bytes,
    target: bytes,
    links: Mapping[bytes, bytes],
    allowed_roots: Collection[bytes],
) -> str | None:
    if not target or b"\0" in target:
        return "has an empty or NUL-containing target"
    if target.startswith(b"/"):
        return "has an absolute target"
    if link_path == b"":
        # A path that *is* a symlink resolves against the store dir: never self-contained.
        return "is the root of the tree"
    current = link_path.split(b"/")[:-1]
    todo = deque(target.split(b"/"))
    hops = 0
    while todo:
        part = todo.popleft()
        if part in (b"", b"."):
            continue
        if part == b"..":
            if current:
                current.pop()
                continue
            # Above the tree's root is the store dir: allowed only straight into a
            # referenced store path, and never back out of it.
            rest = [p for p in todo if p not in (b"", b".")]
            if rest and rest[0] in allowed_roots and not _climbs_out(rest[1:]):
                return None
            return "points outside the tree"
        current.append(part)
        next_target = links.get(b"/".join(current))
        if next_target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return "is part of a symlink loop"
            if not next_target or next_target.startswith(b"/"):
                return "resolves through a link with an absolute target"
            current.pop()
            todo.extendleft(reversed(next_target.split(b"/")))
    return None


def symlink_escapes(
    entry_path: bytes, target: bytes, allowed_roots: Collection[bytes] = ()
) -> bool:
    """Whether one link leaves the tree on its own (lexically, not following others)."""
    return _escape_reason(entry_path, target, {}, allowed_roots) is not None


def find_escaping_link(
    links: Mapping[bytes, bytes], allowed_roots: Collection[bytes] = ()
) -> tuple[bytes, bytes, str] | None:
    """The first link (path, target, why) of a tree that does not resolve inside it.

    ``links`` maps every symlink's relative path to its target; ``allowed_roots`` are
    base names of store paths a link may lead into (``../<base>/...`` from the root).
    """
    for path in sorted(links):
        reason = _escape_reason(path, links[path], links, allowed_roots)
        if reason is not None:
            return path, links[path], reason
    return None
