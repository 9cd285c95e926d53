"""Deterministic SVG identicons, byte-compatible with bc_gitops.

An app without an ``icon`` gets a 5×5 vertically symmetric pattern derived from the MD5
of its UTF-8 name. The output must equal bc_gitops' ``bc_gitops_identicon`` byte for
byte, so apps moved from bc_gitops keep the icons their users recognise:

* colour from bytes 0–2: hue = b0·360 div 256, saturation = 50 + b1·30 div 256,
  lightness = 40 + b2·20 div 256;
* pattern from the bits of bytes 3–10, most significant first: the first 15 bits are
  5 rows of ``[a, b, c]``, each mirrored to ``[a, b, c, b, a]``;
* cell = size div 5; the image is 5·cell square; the background is
  ``hsl(H, S div 2%, min(95, L+40)%)`` with ``rx = cell div 4``; each set cell is a rect
  inset by ``m = cell div 8`` (side ``cell − 2m``, ``rx = m``) filled ``hsl(H, S%, L%)``.
"""

from __future__ import annotations

import base64
import hashlib

DEFAULT_SIZE = 64
_GRID = 5


def _pattern(digest: bytes) -> list[list[bool]]:
    bits = [bool(byte >> shift & 1) for byte in digest[3:11] for shift in range(7, -1, -1)]
    rows = [bits[i : i + 3] for i in range(0, 15, 3)]
    return [[a, b, c, b, a] for a, b, c in rows]


def svg(name: str, size: int = DEFAULT_SIZE) -> str:
    """The SVG identicon of ``name`` (one line, no trailing newline) at ``size`` pixels."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"identicon size must be a positive integer, got {size!r}")
    digest = hashlib.md5(name.encode("utf-8"), usedforsecurity=False).digest()
    hue = digest[0] * 360 // 256
    saturation = 50 + digest[1] * 30 // 256
    lightness = 40 + digest[2] * 20 // 256
    cell = size // _GRID
    actual = cell * _GRID
    color = f"hsl({hue}, {saturation}%, {lightness}%)"
    background = f"hsl({hue}, {saturation // 2}%, {min(95, lightness + 40)}%)"
    margin = cell // 8
    side = cell - 2 * margin
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{actual}" height="{actual}"'
        f' viewBox="0 0 {actual} {actual}">'
        f'<rect width="100%" height="100%" fill="{background}" rx="{cell // 4}"/>'
    ]
    for y, row in enumerate(_pattern(digest)):
        for x, filled in enumerate(row):
            if filled:
                parts.append(
                    f'<rect x="{x * cell + margin}" y="{y * cell + margin}" width="{side}"'
                    f' height="{side}" fill="{color}" rx="{margin}"/>'
                )
    parts.append("</svg>")
    return "".join(parts)


def data_uri(name: str, size: int = DEFAULT_SIZE) -> str:
    """The identicon of ``name`` as a ``data:image/svg+xml;base64,...`` URI."""
    encoded = base64.b64encode(svg(name, size).encode("utf-8")).decode("ascii")
    return f"data:image/svg+xml;base64,{encoded}"
