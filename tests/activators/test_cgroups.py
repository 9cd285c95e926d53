"""cgroup v2 detection and VM groups: against this machine's real /proc and cgroup fs,
and against a directory laid out like a delegated cgroup2 subtree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bstore.activators.cgroups import (
    Cgroup,
    CgroupError,
    CgroupSupport,
    cgroup2_mount,
    detect,
    own_cgroup,
)

MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
35 22 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_parse_mountinfo_and_proc_cgroup() -> None:
    assert cgroup2_mount(MOUNTINFO) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(MOUNTINFO.splitlines()[1]) is None
    assert own_cgroup("4:memory:/x\n0::/user.slice/app\n") == "/user.slice/app"
    assert own_cgroup("0::/\n") == "/"
    assert own_cgroup("4:memory:/x\n") is None


def _fake_proc(tmp_path: Path, mount: Path, own: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(f"35 22 0:31 / {mount} rw - cgroup2 cgroup2 rw\n")
    (proc / "cgroup").write_text(f"0::{own}\n")
    return proc


def _fake_base(tmp_path: Path, controllers: str) -> Path:
    base = tmp_path / "cg" / "svc"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers)
    (base / "cgroup.subtree_control").write_text("")
    return base


@pytest.mark.parametrize(("controllers", "writable", "reason"), [
    ("cpu memory pids\n", True, ""),
    ("cpu pids\n", True, "the memory controller is not available in"),
    ("cpu memory\n", False, "is not writable by this user"),
])
def test_detect(tmp_path: Path, controllers: str, writable: bool, reason: str) -> None:
    base = _fake_base(tmp_path, controllers)
    proc = _fake_proc(tmp_path, tmp_path / "cg", "/svc")
    if not writable:
        if os.getuid() == 0:
            pytest.skip("root can write anywhere")
        base.chmod(0o555)
    support = detect(proc=proc)
    assert support.usable is (reason == "")
    assert reason in support.reason
    if support.usable:
        assert support.base == base


def test_detect_without_cgroup2(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(MOUNTINFO.splitlines()[1] + "\n")
    (proc / "cgroup").write_text("0::/\n")
    assert detect(proc=proc) == CgroupSupport(None, "no cgroup2 file system is mounted")
    assert detect(proc=tmp_path / "nope").reason.startswith("cannot read")


def test_group_limits_and_oom_counter(tmp_path: Path) -> None:
    base = _fake_base(tmp_path, "memory\n")
    group = CgroupSupport(base).group("default-web")
    assert group.path == base / "bstore" / "default-web"
    assert (base / "cgroup.subtree_control").read_text() == "+memory"
    assert (base / "bstore" / "cgroup.subtree_control").read_text() == "+memory"
    (group.path / "memory.swap.max").write_text("max")
    group.set_memory_max(64 * 1024 * 1024)
    assert (group.path / "memory.max").read_text() == str(64 * 1024 * 1024)
    assert (group.path / "memory.swap.max").read_text() == "0"
    group.add_pid(4242)
    assert group.pids() == [4242]
    assert group.oom_kills() == 0
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert group.oom_kills() == 2


@pytest.mark.parametrize(("name", "message"), [
    ("../escape", "cgroup name '../escape' is not valid"),
    ("", "cgroup name '' is not valid"),
    ("a/b", "cgroup name 'a/b' is not valid"),
])
def test_bad_group_names(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(CgroupError, match=message):
        CgroupSupport(_fake_base(tmp_path, "memory\n")).group(name)


def test_unusable_support_refuses_groups_and_bad_limits(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cgroups are not usable here: no memory"):
        CgroupSupport(None, "no memory").group("x")
    with pytest.raises(CgroupError, match="memory limit 0 for"):
        Cgroup(tmp_path).set_memory_max(0)


def test_this_machine(tmp_path: Path) -> None:
    """The real detection agrees with the real files: usable exactly when our cgroup2
    group offers the memory controller and is writable."""
    support = detect()
    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    own = own_cgroup(Path("/proc/self/cgroup").read_text())
    if mount is None or own is None:
        assert not support.usable
        return
    base = mount / own.lstrip("/")
    try:
        controllers = (base / "cgroup.controllers").read_text().split()
    except OSError:
        controllers = []
    expected = "memory" in controllers and os.access(base, os.W_OK)
    assert support.usable is expected, support.reason
    if not expected:
        assert str(base) in support.reason


def test_remove_leaves_a_busy_group(tmp_path: Path) -> None:
    group = Cgroup(tmp_path / "g")
    group.path.mkdir()
    (group.path / "cgroup.procs").write_text("1\n")
    group.remove()  # a plain directory with a file: ENOTEMPTY, left alone
    assert group.path.exists()
    (group.path / "cgroup.procs").unlink()
    group.remove()
    assert not group.path.exists()
    group.remove()  # already gone: fine
