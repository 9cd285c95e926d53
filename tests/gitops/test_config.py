"""bstore.toml loading: every key, its forms, env and flag overrides, and bad input."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bstore.gitops.config import (
    Config,
    ConfigError,
    HealthDefaults,
    Secret,
    config_path,
    env_var,
    known_keys,
    load_config,
)

REPO = "file:///srv/specs.git"
ED_KEY = "cache-1:" + base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="module")
def pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def write(tmp_path: Path, text: str, name: str = "bstore.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, body: str, env: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> Config:
    return load_config(write(tmp_path, body), env=env or {}, overrides=overrides)


# --- defaults and every key ---------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, f'repo_url = "{REPO}"\n')
    assert config.repo_url == REPO
    assert (config.branch, config.apps_dir, config.profile, config.activator) == (
        "main", "apps", "default", "embedded")
    assert config.reconcile_interval == 60.0 and config.reconcile_interval_ms == 60000
    assert config.local_path is None and config.hex_repositories == ()
    assert config.health == HealthDefaults(30.0, 5.0)
    assert not config.require_signed_commits and not config.allow_history_rewrite
    assert (config.api_host, config.api_port) == ("127.0.0.1", 8780)
    assert config.api_token is None and config.api_token_value(env={}) is None
    assert config.substituters == config.trusted_public_keys == config.mesh_peers == ()
    assert config.git.fetch_timeout == 600.0 and config.git.fetch_max_bytes == 2 << 30
    assert config.source == tmp_path / "bstore.toml"
    assert config.gitops_dir(tmp_path) == tmp_path / "gitops" / "default"


def test_every_key_from_the_file(tmp_path: Path, pem: str) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/hex.pem").write_text(pem)
    (tmp_path / "keys/allowed_signers").write_text("")
    (tmp_path / "keys/ring.gpg").write_bytes(b"")
    (tmp_path / "keys/id_ed25519").write_text("")
    body = f'''
repo_url = "https://git.example.org/ops/specs.git"
branch = "production"
local_path = "state/specs"
apps_dir = "deploy/apps"
reconcile_interval = "5m"
profile = "edge-1"
activator = "vm"
require_signed_commits = true
allowed_signers = "keys/allowed_signers"
gpg_keyring = "keys/ring.gpg"
allow_history_rewrite = true
api_address = "[::1]:9000"
api_token_env = "OPS_TOKEN"
substituters = ["https://cache.example.org", "file:///var/cache/bstore"]
trusted_public_keys = ["{ED_KEY}"]
mesh_peers = ["http://10.0.0.2:8780"]

[[hex_repositories]]
name = "hexpm"
url = "https://repo.hex.pm"
public_key = "keys/hex.pem"

[[hex_repositories]]
name = "internal"
url = "https://hex.example.org"
public_key = """{pem}"""

[health]
interval = 2500
timeout = "750ms"

[git]
username = "deploy"
ssh_key = "keys/id_ed25519"
token_env = "GIT_TOKEN"
fetch_timeout = "2m"
fetch_max_bytes = 1048576
'''
    config = load(tmp_path, body, env={"OPS_TOKEN": "t0ken"})
    assert config.branch == "production"
    assert config.local_path == tmp_path / "state/specs"
    assert config.gitops_dir(Path("/elsewhere")) == tmp_path / "state/specs"
    assert config.apps_dir == "deploy/apps"
    assert config.reconcile_interval == 300.0
    assert (config.profile, config.activator) == ("edge-1", "vm")
    assert config.require_signed_commits and config.allow_history_rewrite
    assert config.allowed_signers == tmp_path / "keys/allowed_signers"
    assert config.gpg_keyring == tmp_path / "keys/ring.gpg"
    assert (config.api_host, config.api_port) == ("::1", 9000)
    assert config.api_token_value(env={"OPS_TOKEN": "t0ken"}) == "t0ken"
    assert config.substituters == ("https://cache.example.org", "file:///var/cache/bstore")
    assert config.trusted_public_keys == (ED_KEY,)
    assert config.mesh_peers == ("http://10.0.0.2:8780",)
    assert [r.name for r in config.hex_repositories] == ["hexpm", "internal"]
    assert all(r.public_key.strip() == pem.strip() for r in config.hex_repositories)
    assert config.health == HealthDefaults(interval=2.5, timeout=0.75)
    creds = config.git.credentials()
    assert (creds.username, creds.ssh_key, creds.token_env) == (
        "deploy", tmp_path / "keys/id_ed25519", "GIT_TOKEN")
    limits = config.git.limits()
    assert (limits.fetch_seconds, limits.fetch_bytes) == (120.0, 1048576)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("60000", 60.0),  # TOML integer: milliseconds, like the original
        ("500", 0.5),
        ('"60s"', 60.0),
        ('"500ms"', 0.5),
        ('"1.5s"', 1.5),
        ('"5m"', 300.0),
        ('"2h"', 7200.0),
        ('" 10 s "', 10.0),
    ],
)
def test_interval_forms(tmp_path: Path, value: str, seconds: float) -> None:
    config = load(tmp_path, f'repo_url = "{REPO}"\nreconcile_interval = {value}\n')
    assert config.reconcile_interval == pytest.approx(seconds)


# --- bad values in the file: message names the key and the file -----------------------------


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ('branch = 3', "branch", "expected a string, got an integer 3"),
        ('branch = "a..b"', "branch", "'a..b' is not a valid branch name"),
        ('branch = "-x"', "branch", "'-x' is not a valid branch name"),
        ('apps_dir = "../etc"', "apps_dir", "must be a relative path inside the repository"),
        ('apps_dir = "/abs"', "apps_dir", "must be a relative path inside the repository"),
        ('apps_dir = ["x"]', "apps_dir", "expected a string, got an array"),
        ('reconcile_interval = 1.5', "reconcile_interval", "expected a duration, got a float"),
        ('reconcile_interval = "soon"', "reconcile_interval", "'soon' is not a duration"),
        ('reconcile_interval = "10d"', "reconcile_interval", "'10d' is not a duration"),
        ('reconcile_interval = 0', "reconcile_interval", "must be positive"),
        ('reconcile_interval = -5', "reconcile_interval", "must be positive"),
        ('reconcile_interval = true', "reconcile_interval", "expected a duration, got a boolean"),
        ('reconcile_interval = "999h"', "reconcile_interval", "at most 30 days"),
        ('profile = "../x"', "profile", "must be letters, digits"),
        ('profile = ""', "profile", "must be letters, digits"),
        ('activator = "a b"', "activator", "must be letters, digits"),
        ('require_signed_commits = "yes"', "require_signed_commits",
         "expected a boolean (true or false), got a string 'yes'"),
        ('allow_history_rewrite = 1', "allow_history_rewrite", "expected a boolean"),
        ('allowed_signers = "missing/file"', "allowed_signers", "does not exist"),
        ('gpg_keyring = 7', "gpg_keyring", "expected a string, got an integer"),
        ('api_address = "8780"', "api_address", "is not 'host:port'"),
        ('api_address = "127.0.0.1:70000"', "api_address", "port 70000"),
        ('api_address = "[zz::1]:80"', "api_address", "is not 'host:port'"),
        ('api_address = "0.0.0.0:8780"', "api_address",
         "listens beyond this machine but no api_token or api_token_env is set"),
        ('api_token_env = "BAD-NAME"', "api_token_env", "is not an environment variable name"),
        ('substituters = "https://x"', "substituters", "expected an array, got a string"),
        ('substituters = ["ftp://x"]', "substituters[0]", "is not a file/http/https URL"),
        ('substituters = [1]', "substituters[0]", "expected a string, got an integer"),
        ('trusted_public_keys = ["nocolon"]', "trusted_public_keys[0]",
         "is not 'name:<base64 of a 32-byte ed25519 key>'"),
        ('trusted_public_keys = ["k:AAAA"]', "trusted_public_keys[0]", "32-byte"),
        ('mesh_peers = ["file:///x"]', "mesh_peers[0]", "is not a http/https URL"),
        ('hex_repositories = {name = "x"}', "hex_repositories", "expected an array, got a table"),
        ('hex_repositories = ["x"]', "hex_repositories[0]", "expected a table"),
        ('hex_repositories = [{name = "x", url = "https://h"}]', "hex_repositories[0]",
         "missing 'public_key'"),
        ('hex_repositories = [{name = "x", url = "https://h", public_key = "-----BEGIN x"}]',
         "hex_repositories[0]", "public_key is not a PEM public key"),
        ('hex_repositories = [{name = "x", url = "https://h", public_key = "nope.pem"}]',
         "hex_repositories[0].public_key", "does not exist"),
        ('hex_repositories = [{name = "x", url = "https://h", public_key = "k", color = 1}]',
         "hex_repositories[0]", "unknown key 'color'"),
        ('health = 5', "health", "expected a table ([health]), got an integer"),
        ('[health]\ntimeout = "fast"', "health.timeout", "'fast' is not a duration"),
        ('[git]\nfetch_max_bytes = -1', "git.fetch_max_bytes", "must be a positive integer"),
        ('[git]\nfetch_max_bytes = "1G"', "git.fetch_max_bytes", "expected an integer"),
        ('[git]\ntoken_env = "has space"', "git.token_env", "not an environment variable"),
        ('[git]\nssh_key = "nokey"', "git.ssh_key", "does not exist"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path: Path, body: str, key: str,
                                      problem: str) -> None:
    # repo_url first: a [table] header in body would swallow it otherwise
    path = write(tmp_path, f'repo_url = "{REPO}"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert err.message.startswith(f"config key {key!r} in {path}: "), err.message
    assert problem in err.message
    assert err.key == key and err.source == str(path)


def test_signed_commits_need_a_trust_source(tmp_path: Path) -> None:
    path = write(tmp_path, f'repo_url = "{REPO}"\nrequire_signed_commits = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == (
        f"config key 'require_signed_commits' in {path}: commits must be signed but neither"
        " 'allowed_signers' nor 'gpg_keyring' is set")
    assert "allowed_signers" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ('repo_url = 5', "repo_url", "expected a string, got an integer 5"),
        ('repo_url = "ftp://x/y"', "repo_url", "has an unsupported transport"),
        ('repo_url = "-uhttps://x"', "repo_url", "is not valid"),
        ('repo_url = "https://user:s3cret@h/x"\nbranch = "a..b"', "branch", "not a valid"),
    ],
)
def test_bad_repo_url(tmp_path: Path, body: str, key: str, problem: str) -> None:
    path = write(tmp_path, body + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith(f"config key {key!r} in {path}: ")
    assert problem in info.value.message
    assert "s3cret" not in info.value.message


@pytest.mark.parametrize(
    ("body", "expected", "hint"),
    [
        (f'repo_url = "{REPO}"\nbrnach = "main"\n', "unknown config key 'brnach'",
         "did you mean 'branch'?"),
        (f'repo_url = "{REPO}"\n[health]\ninterval = 1000\nretries = 3\n',
         "unknown config key 'health.retries'", None),
        (f'repo_url = "{REPO}"\n[git]\npassword = "x"\n', "unknown config key 'git.password'",
         None),
        (f'repo_url = "{REPO}"\n[metrics]\nport = 1\n', "unknown config key 'metrics'",
         None),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, body: str, expected: str,
                                 hint: str | None) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == f"{expected} in {path}"
    if hint:
        assert info.value.hint == hint


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'repo_url = "x', "is not valid TOML"),
        (b"repo_url = 'a'\nrepo_url = 'b'\n", "is not valid TOML"),
        (b"\xff\xfe", "is not UTF-8 text"),
    ],
)
def test_unreadable_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bstore.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith(f"config file {str(path)!r} {expected}")


def test_missing_file_named_explicitly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file '.*nope.toml'"):
        load_config(tmp_path / "nope.toml", env={})


def test_repo_url_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, 'branch = "main"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == (
        f"config key 'repo_url' is required and is not set (looked in {path},"
        " $BSTORE_REPO_URL and --repo-url)")


# --- environment and flag overrides ------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("BSTORE_REPO_URL", "https://other.example/x.git", "repo_url",
         "https://other.example/x.git"),
        ("BSTORE_BRANCH", "staging", "branch", "staging"),
        ("BSTORE_APPS_DIR", "svc", "apps_dir", "svc"),
        ("BSTORE_RECONCILE_INTERVAL", "1500", "reconcile_interval", 1.5),
        ("BSTORE_RECONCILE_INTERVAL", "90s", "reconcile_interval", 90.0),
        ("BSTORE_PROFILE", "blue", "profile", "blue"),
        ("BSTORE_ACTIVATOR", "vm", "activator", "vm"),
        ("BSTORE_ALLOW_HISTORY_REWRITE", "yes", "allow_history_rewrite", True),
        ("BSTORE_ALLOW_HISTORY_REWRITE", "0", "allow_history_rewrite", False),
        ("BSTORE_API_ADDRESS", "127.0.0.1:0", "api_port", 0),
        ("BSTORE_SUBSTITUTERS", "https://a.example, file:///b", "substituters",
         ("https://a.example", "file:///b")),
        ("BSTORE_SUBSTITUTERS", '["https://a.example"]', "substituters", ("https://a.example",)),
        ("BSTORE_MESH_PEERS", "http://p1:1 http://p2:2", "mesh_peers",
         ("http://p1:1", "http://p2:2")),
        ("BSTORE_TRUSTED_PUBLIC_KEYS", ED_KEY, "trusted_public_keys", (ED_KEY,)),
        ("BSTORE_HEALTH_TIMEOUT", "2s", "health", HealthDefaults(30.0, 2.0)),
        ("BSTORE_LOCAL_PATH", "/var/lib/specs", "local_path", Path("/var/lib/specs")),
    ],
)
def test_env_overrides_file(tmp_path: Path, var: str, value: str, attr: str,
                            expected: object) -> None:
    config = load(tmp_path, f'repo_url = "{REPO}"\nbranch = "main"\nallow_history_rewrite = true\n',
                  env={var: value})
    assert getattr(config, attr) == expected


def test_env_var_names() -> None:
    assert env_var("repo_url") == "BSTORE_REPO_URL"
    assert env_var("health.interval") == "BSTORE_HEALTH_INTERVAL"
    assert env_var("git.token_env") == "BSTORE_GIT_TOKEN_ENV"
    assert "hex_repositories" in known_keys() and "git.fetch_max_bytes" in known_keys()


def test_env_hex_repositories_as_toml(tmp_path: Path, pem: str) -> None:
    (tmp_path / "hex.pem").write_text(pem)
    value = f'[{{name = "hexpm", url = "https://repo.hex.pm", public_key = "{tmp_path}/hex.pem"}}]'
    config = load_config(None, env={"BSTORE_REPO_URL": REPO,
                                     "BSTORE_HEX_REPOSITORIES": value})
    assert config.hex_repositories[0].name == "hexpm"
    assert config.source is None


@pytest.mark.parametrize(
    ("var", "value", "key", "problem"),
    [
        ("BSTORE_RECONCILE_INTERVAL", "1.5", "reconcile_interval", "'1.5' is not a duration"),
        ("BSTORE_ALLOW_HISTORY_REWRITE", "maybe", "allow_history_rewrite",
         "'maybe' is not a boolean"),
        ("BSTORE_BRANCH", "a b", "branch", "not a valid branch name"),
        ("BSTORE_SUBSTITUTERS", "[unclosed", "substituters", "is not a TOML array"),
        ("BSTORE_GIT_FETCH_MAX_BYTES", "lots", "git.fetch_max_bytes", "expected an integer"),
        ("BSTORE_REQUIRE_SIGNED_COMMITS", "true", "require_signed_commits",
         "neither 'allowed_signers' nor 'gpg_keyring' is set"),
        ("BSTORE_API_ADDRESS", "0.0.0.0:1", "api_address", "listens beyond this machine"),
    ],
)
def test_bad_env_value_names_the_variable(tmp_path: Path, var: str, value: str, key: str,
                                          problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f'repo_url = "{REPO}"\n', env={var: value})
    err = info.value
    assert err.message.startswith(f"config key {key!r} in environment variable {var}: ")
    assert problem in err.message
    assert err.source == f"environment variable {var}"


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    config = load(
        tmp_path, f'repo_url = "{REPO}"\nbranch = "file"\nreconcile_interval = "1m"\n',
        env={"BSTORE_BRANCH": "env", "BSTORE_PROFILE": "envprofile"},
        overrides={"branch": "flag", "reconcile_interval": 250, "profile": None,
                   "health_interval": "3s", "git.fetch_timeout": "10s",
                   "allow-history-rewrite": True},
    )
    assert config.branch == "flag"
    assert config.reconcile_interval == 0.25
    assert config.profile == "envprofile"  # a flag left as None does not override
    assert config.health.interval == 3.0 and config.git.fetch_timeout == 10.0
    assert config.allow_history_rewrite


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"branch": 5}, "config key 'branch' in option --branch: expected a string"),
        ({"reconcile_interval": "x"}, "config key 'reconcile_interval' in option"
         " --reconcile-interval: 'x' is not a duration"),
        ({"health_interval": 0}, "config key 'health.interval' in option --health-interval:"),
        ({"colour": "red"}, "unknown config key 'colour' in the command-line overrides"),
    ],
)
def test_bad_flag_names_the_option(tmp_path: Path, overrides: dict[str, Any],
                                   expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        load(tmp_path, f'repo_url = "{REPO}"\n', overrides=overrides)


def test_config_path_resolution(tmp_path: Path) -> None:
    default = write(tmp_path, f'repo_url = "{REPO}"\n', "default.toml")
    assert config_path("x.toml", {"BSTORE_CONFIG": "y.toml"}, default) == Path("x.toml")
    assert config_path(None, {"BSTORE_CONFIG": "y.toml"}, default) == Path("y.toml")
    assert config_path(None, {}, default) == default
    assert config_path(None, {}, tmp_path / "absent.toml") is None
    via_env = write(tmp_path, f'repo_url = "{REPO}"\nprofile = "fromenv"\n', "env.toml")
    assert load_config(env={"BSTORE_CONFIG": str(via_env)}).profile == "fromenv"


def test_relative_env_paths_resolve_against_cwd(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={"BSTORE_REPO_URL": REPO, "BSTORE_LOCAL_PATH": "here"})
    assert config.local_path == tmp_path / "here"


# --- secrets --------------------------------------------------------------------------------


def test_api_token_never_shown(tmp_path: Path) -> None:
    config = load(tmp_path, f'repo_url = "{REPO}"\napi_address = "0.0.0.0:8780"\n',
                  env={"BSTORE_API_TOKEN": "hunter2-secret"})
    assert config.api_token_value() == "hunter2-secret"
    assert isinstance(config.api_token, Secret) and config.api_token.matches("hunter2-secret")
    for shown in (repr(config), str(config), json.dumps(config.to_dict()),
                  repr(config.api_token), str(config.api_token)):
        assert "hunter2" not in shown
    assert config.to_dict()["api_token"] == "<set>"


def test_wrong_type_secret_is_not_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, f'repo_url = "{REPO}"\napi_token = ["hunter2"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == (
        f"config key 'api_token' in {path}: expected a string, got an array (hidden)")


def test_api_token_env_unset_is_reported_when_used(tmp_path: Path) -> None:
    path = write(tmp_path, f'repo_url = "{REPO}"\napi_token_env = "BSTORE_TEST_TOKEN"\n')
    config = load_config(path, env={})
    with pytest.raises(ConfigError) as info:
        config.api_token_value(env={})
    assert info.value.message == (f"config key 'api_token_env' in {path}: environment"
                                  " variable BSTORE_TEST_TOKEN is not set")


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="config key 'branch' in the configuration: "):
        Config(repo_url=REPO, branch="bad..name")
    with pytest.raises(ConfigError, match=r"'health\.timeout'"):
        HealthDefaults(timeout=-1)
    config = Config(repo_url=REPO)
    with pytest.raises(AttributeError):
        config.branch = "x"  # type: ignore[misc]


def test_real_ed25519_public_key_is_trusted(tmp_path: Path) -> None:
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    key = "host-a-1:" + base64.b64encode(raw).decode()
    config = load(tmp_path, f'repo_url = "{REPO}"\ntrusted_public_keys = ["{key}"]\n')
    assert config.trusted_public_keys == (key,)
