"""``bstore demo``: the main job on a built-in example (see :mod:`.run`)."""
