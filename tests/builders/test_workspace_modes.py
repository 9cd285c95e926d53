"""The build's copy of a source taken from the store is writable by its owner (the
store's tree is read-only; a build that is not root must still write ebin/ and _build/)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bstore.builders.buildsystems.base import prepare_workspace


@pytest.mark.parametrize(("dir_mode", "file_mode"), [(0o555, 0o444), (0o500, 0o400),
                                                     (0o755, 0o555)])
def test_source_copy_is_owner_writable(tmp_path: Path, dir_mode: int, file_mode: int) -> None:
    source = tmp_path / "store-src"
    (source / "src" / "sub").mkdir(parents=True)
    (source / "src" / "app.erl").write_text("-module(app).\n")
    (source / "src" / "sub" / "x.hrl").write_text("%% x\n")
    (source / "link").symlink_to("src/app.erl")
    for path in (source / "src" / "app.erl", source / "src" / "sub" / "x.hrl"):
        path.chmod(file_mode)
    for path in (source / "src" / "sub", source / "src", source):
        path.chmod(dir_mode)
    try:
        src, _deps = prepare_workspace(source, tmp_path / "work", [])
    finally:
        for dirpath, _dirs, _files in os.walk(source):
            Path(dirpath).chmod(0o755)
    for path in (src, src / "src", src / "src" / "sub", src / "src" / "app.erl",
                 src / "src" / "sub" / "x.hrl"):
        mode = path.stat().st_mode
        assert mode & stat.S_IWUSR, f"{path} is not writable: {oct(mode)}"
        # Only the write bit is added: execute and group/other bits stay as they were.
        expected = (dir_mode if path.is_dir() else file_mode) | stat.S_IWUSR
        assert stat.S_IMODE(mode) == expected
    # The source itself is untouched.
    assert stat.S_IMODE((source / "src" / "app.erl").stat().st_mode) == file_mode
