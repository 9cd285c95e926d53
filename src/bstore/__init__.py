"""bstore: GitOps for BEAM applications on a Nix-style content-addressed store."""

from __future__ import annotations

__version__ = "0.1.0"
