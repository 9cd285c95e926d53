"""Where the cookie comes from, how it is stored, and that it never shows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bstore.activators.cookie import (
    COOKIE_FILE,
    Cookie,
    CookieError,
    cookie_home,
    resolve_cookie,
    vm_environment,
)


def test_order_configured_env_home_generated(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    env = {"RELEASE_COOKIE": "from_release", "ERLANG_COOKIE": "from_erlang"}
    assert resolve_cookie(state, "from_config", environ=env, home=home) == Cookie(
        "from_config", "configuration")
    assert resolve_cookie(state, None, environ=env, home=home).source == "$RELEASE_COOKIE"
    assert resolve_cookie(state, None, environ={"ERLANG_COOKIE": "e"}, home=home) == Cookie(
        "e", "$ERLANG_COOKIE")
    (home / COOKIE_FILE).write_text("user_cookie\n")
    assert resolve_cookie(state, None, environ={}, home=home) == Cookie(
        "user_cookie", str(home / COOKIE_FILE))
    assert not state.exists()


def test_generated_cookie_is_random_private_and_stable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    first = resolve_cookie(tmp_path / "state", environ={}, home=home)
    other = resolve_cookie(tmp_path / "state2", environ={}, home=home)
    assert first.source == str(tmp_path / "state" / "cookie")
    assert len(first.value) == 40 and first.value != other.value
    assert stat.S_IMODE(os.stat(first.source).st_mode) == 0o400
    assert resolve_cookie(tmp_path / "state", environ={}, home=home) == first
    # No temp files are left next to it.
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["cookie"]


def test_value_is_hidden_from_repr_and_messages(tmp_path: Path) -> None:
    cookie = Cookie("sekrit_value", "$RELEASE_COOKIE")
    assert "sekrit" not in repr(cookie) and "sekrit" not in str(cookie)
    assert "sekrit" not in f"{cookie}"


@pytest.mark.parametrize("value", ["has space", "quote'd", "a\nb", "x" * 256, "é"])
def test_unusable_cookie_is_refused_without_quoting_it(tmp_path: Path, value: str) -> None:
    with pytest.raises(CookieError) as err:
        resolve_cookie(tmp_path, value, environ={}, home=tmp_path)
    assert "the cookie from configuration is not usable" in err.value.message
    assert value not in err.value.message


def test_cookie_home_writes_a_0400_file_in_a_0700_dir(tmp_path: Path) -> None:
    home = cookie_home(tmp_path / "h", Cookie("abc", "test"))
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    path = home / COOKIE_FILE
    assert path.read_text() == "abc" and stat.S_IMODE(os.stat(path).st_mode) == 0o400
    inode = os.stat(path).st_ino
    cookie_home(tmp_path / "h", Cookie("abc", "test"))
    assert os.stat(path).st_ino == inode  # unchanged value: file left alone
    cookie_home(tmp_path / "h", Cookie("xyz", "test"))
    assert path.read_text() == "xyz" and stat.S_IMODE(os.stat(path).st_mode) == 0o400


def test_vm_environment_drops_cookie_variables(tmp_path: Path) -> None:
    env = vm_environment(tmp_path, {"PATH": "/bin", "RELEASE_COOKIE": "s", "ERLANG_COOKIE": "s",
                                    "ERL_FLAGS": "-setcookie s", "HOME": "/root"})
    assert env == {"PATH": "/bin", "HOME": str(tmp_path), "ERL_EPMD_ADDRESS": "127.0.0.1"}
