"""Generations: numbered, immutable profiles of store paths, switched atomically.

- :mod:`.manifest`    the generation manifest value (pure; canonical JSON; strict parsing)
- :mod:`.generation`  a generation as a store path: built from specs + outputs, read back
- :mod:`.profiles`    ``profiles/<p>`` → ``<p>-<N>-link`` → ``store/<digest>-generation``
- :mod:`.journal`     the activation journal and crash recovery
- :mod:`.switch`      journaled switch, rollback, deletion (with an activation hook)
- :mod:`.diff`        what changed between two generations (pure)
"""
