"""The GitOps configuration: ``bstore.toml``, environment overrides, command-line flags.

Precedence, lowest to highest: built-in defaults, the file (``--config``,
``$BSTORE_CONFIG``, else an optional default path), ``BSTORE_<KEY>`` environment
variables, explicit overrides (the CLI's flags). Keys of a table are dotted
(``health.interval``) and their variable joins them with ``_``
(``BSTORE_HEALTH_INTERVAL``).

Everything is checked when loading, before anything runs: an unknown key, a wrong type
or a bad value is a :class:`ConfigError` naming the key and where it came from (the
file, the environment variable, or the flag). Secrets (``api_token``) are held in a
:class:`Secret` and never appear in ``repr``, ``str`` or :meth:`Config.to_dict`;
error messages about them never quote the value.

Durations (``reconcile_interval``, ``health.*``, ``git.fetch_timeout``) accept an
integer number of milliseconds (the original's unit) or a string with a unit:
``"500ms"``, ``"60s"``, ``"1.5s"``, ``"5m"``, ``"1h"``. They are stored as seconds.
"""

from __future__ import annotations

import difflib
import hmac
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bstore.builders.fetch_git import GitCredentials, GitLimits
from bstore.errors import BstoreError
from bstore.gitops.config_values import (
    ENV_NAME_RE,
    bool_from_text,
    check_apps_dir,
    check_branch,
    check_env_name,
    check_hex_name,
    check_name,
    check_pem,
    check_positive,
    check_public_key,
    check_repo_url,
    check_seconds,
    check_url,
    duration_seconds,
    is_loopback,
    split_address,
)

ENV_PREFIX = "BSTORE_"
CONFIG_ENV = "BSTORE_CONFIG"


class ConfigError(BstoreError):
    """A configuration key that is unknown, missing, of the wrong type or invalid."""

    def __init__(
        self, message: str, hint: str | None = None, *, key: str | None = None,
        source: str | None = None, problem: str | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.key = key
        self.source = source
        #: The message without the "config key ... in ...:" prefix.
        self.problem = problem or message


class Secret:
    """A secret string: shown as ``'********'`` everywhere; :meth:`reveal` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that needs it (an auth check)."""
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison with ``candidate``."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other._value)

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


@dataclass(frozen=True)
class HexRepository:
    """A Hex package repository and the PEM public key its registry is signed with."""

    name: str
    url: str
    public_key: str

    def __post_init__(self) -> None:
        _validate("hex repository", "name", check_hex_name, self.name)
        _validate("hex repository", "url", lambda v: check_url(v, ("https", "http", "file")),
                  self.url)
        _validate("hex repository", "public_key", check_pem, self.public_key)


@dataclass(frozen=True)
class HealthDefaults:
    """Health-check timing used when a spec does not say (seconds)."""

    interval: float = 30.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        _validate("health", "interval", check_seconds, self.interval)
        _validate("health", "timeout", check_seconds, self.timeout)


@dataclass(frozen=True)
class GitSettings:
    """How the specs repository is reached: credentials and fetch caps."""

    username: str | None = None
    ssh_key: Path | None = None
    ssh_public_key: Path | None = None
    ssh_passphrase_env: str | None = None
    token_env: str | None = None
    known_hosts: Path | None = None
    ca_bundle: Path | None = None
    fetch_timeout: float = 600.0
    fetch_max_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        _validate("git", "fetch_timeout", check_seconds, self.fetch_timeout)
        _validate("git", "fetch_max_bytes", check_positive, self.fetch_max_bytes)
        for key in ("ssh_passphrase_env", "token_env"):
            if getattr(self, key) is not None:
                _validate("git", key, check_env_name, getattr(self, key))

    def credentials(self) -> GitCredentials:
        """The credentials for :class:`bstore.builders.fetch_git.GitFetcher`."""
        return GitCredentials(
            username=self.username, ssh_key=self.ssh_key, ssh_public_key=self.ssh_public_key,
            ssh_passphrase_env=self.ssh_passphrase_env, token_env=self.token_env,
            known_hosts=self.known_hosts, ca_bundle=self.ca_bundle,
        )

    def limits(self) -> GitLimits:
        """The fetch caps for :class:`bstore.builders.fetch_git.GitFetcher`."""
        return GitLimits(fetch_seconds=self.fetch_timeout, fetch_bytes=self.fetch_max_bytes)


@dataclass(frozen=True)
class Config:
    """The whole GitOps configuration. ``source`` is the file it was read from, if any."""

    repo_url: str
    branch: str = "main"
    local_path: Path | None = None
    apps_dir: str = "apps"
    reconcile_interval: float = 60.0
    profile: str = "default"
    activator: str = "embedded"
    hex_repositories: tuple[HexRepository, ...] = ()
    health: HealthDefaults = field(default_factory=HealthDefaults)
    require_signed_commits: bool = False
    allowed_signers: Path | None = None
    gpg_keyring: Path | None = None
    allow_history_rewrite: bool = False
    api_address: str = "127.0.0.1:8780"
    api_token: Secret | None = field(default=None, repr=False)
    api_token_env: str | None = None
    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    mesh_peers: tuple[str, ...] = ()
    git: GitSettings = field(default_factory=GitSettings)
    source: Path | None = None

    def __post_init__(self) -> None:
        where = str(self.source) if self.source else "the configuration"

        def fail(key: str, problem: str, hint: str | None = None) -> ConfigError:
            return ConfigError(f"config key {key!r} in {where}: {problem}", hint,
                               key=key, source=where, problem=problem)

        checks: tuple[tuple[str, Callable[[Any], object], object], ...] = (
            ("repo_url", check_repo_url, self.repo_url),
            ("branch", check_branch, self.branch),
            ("apps_dir", check_apps_dir, self.apps_dir),
            ("reconcile_interval", check_seconds, self.reconcile_interval),
            ("profile", check_name, self.profile),
            ("activator", check_name, self.activator),
            ("api_address", split_address, self.api_address),
        )
        for key, check, value in checks:
            try:
                check(value)
            except ValueError as exc:
                raise fail(key, str(exc)) from exc
        if self.api_token_env is not None and not ENV_NAME_RE.fullmatch(self.api_token_env):
            raise fail("api_token_env",
                       f"{self.api_token_env!r} is not an environment variable name")
        if self.require_signed_commits and not (self.allowed_signers or self.gpg_keyring):
            raise fail(
                "require_signed_commits",
                "commits must be signed but neither 'allowed_signers' nor 'gpg_keyring' is set",
                "set allowed_signers (SSH) and/or gpg_keyring (GPG)",
            )
        host, _port = split_address(self.api_address)
        if not is_loopback(host) and self.api_token is None and self.api_token_env is None:
            raise fail(
                "api_address",
                f"{self.api_address!r} listens beyond this machine but no api_token or"
                " api_token_env is set",
                "set api_token_env, or listen on 127.0.0.1",
            )

    @property
    def api_host(self) -> str:
        """The host part of ``api_address`` (without IPv6 brackets)."""
        return split_address(self.api_address)[0]

    @property
    def api_port(self) -> int:
        """The port of ``api_address`` (0: any free port)."""
        return split_address(self.api_address)[1]

    @property
    def reconcile_interval_ms(self) -> int:
        """``reconcile_interval`` in milliseconds (the original's unit)."""
        return round(self.reconcile_interval * 1000)

    def gitops_dir(self, root: Path) -> Path:
        """Where this profile's repository and checkouts live under the state ``root``."""
        return self.local_path if self.local_path else root / "gitops" / self.profile

    def api_token_value(self, env: Mapping[str, str] | None = None) -> str | None:
        """The API token: ``api_token``, else the variable ``api_token_env`` names."""
        if self.api_token is not None:
            return self.api_token.reveal()
        if self.api_token_env is None:
            return None
        value = (os.environ if env is None else env).get(self.api_token_env)
        if not value:
            where = str(self.source) if self.source else "the configuration"
            raise ConfigError(
                f"config key 'api_token_env' in {where}: environment variable"
                f" {self.api_token_env} is not set",
                hint=f"export {self.api_token_env}=<token> before starting the daemon",
                key="api_token_env", source=where,
            )
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the API token appears only as ``"<set>"``."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, HexRepository | HealthDefaults | GitSettings):
                return {k: plain(v) for k, v in vars(value).items()}
            return value

        out = {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}
        out["api_token"] = "<set>" if self.api_token is not None else None
        return out


# --- value checks shared by the dataclasses and the loader (raise ValueError) ---------


def _validate(table: str, key: str, check: Callable[[Any], object], value: Any) -> None:
    """Run ``check`` for a directly constructed value, mapping to :class:`ConfigError`."""
    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"config key '{table}.{key}': {exc}", key=f"{table}.{key}",
                          problem=str(exc)) from exc


# --- the loader ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """Where one value came from, for messages and for resolving relative paths."""

    key: str
    where: str  # "/etc/bstore.toml", "environment variable BSTORE_X", "option --x"
    base: Path  # relative paths are relative to this directory
    textual: bool  # the value is a string to be parsed (env, or a string flag)
    secret: bool = False

    def error(self, problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(
            f"config key {self.key!r} in {self.where}: {problem}",
            hint=hint, key=self.key, source=self.where, problem=problem,
        )

    def show(self, value: object) -> str:
        return "(hidden)" if self.secret else repr(value)


def _type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a float", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def _want(value: object, kind: type | tuple[type, ...], what: str, origin: _Origin) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass in Python, but `true` is never a valid number of anything.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise origin.error(f"expected {what}, got {_type_name(value)} {origin.show(value)}")


def _p_str(value: object, o: _Origin) -> str:
    _want(value, str, "a string", o)
    assert isinstance(value, str)
    return value


def _p_opt_str(value: object, o: _Origin) -> str | None:
    return _p_str(value, o) or None


def _p_bool(value: object, o: _Origin) -> bool:
    if o.textual and isinstance(value, str):
        try:
            return bool_from_text(value)
        except ValueError as exc:
            raise o.error(str(exc), hint="use true or false") from exc
    _want(value, bool, "a boolean (true or false)", o)
    return bool(value)


def _p_int(value: object, o: _Origin) -> int:
    if o.textual and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    _want(value, int, "an integer", o)
    assert isinstance(value, int)
    return value


def _p_duration(value: object, o: _Origin) -> float:
    """Integer milliseconds or a string with a unit; returns seconds."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise o.error(
            f"expected a duration, got {_type_name(value)} {value!r}",
            hint="use integer milliseconds or a string with a unit, like \"1.5s\"",
        )
    try:
        return duration_seconds(value)
    except ValueError as exc:
        raise o.error(
            str(exc), hint="use integer milliseconds or a string like \"500ms\", \"60s\", \"5m\""
        ) from exc


def _p_path(value: object, o: _Origin) -> Path | None:
    if isinstance(value, Path):
        value = str(value)
    text = _p_str(value, o)
    if not text:
        return None
    if "\0" in text:
        raise o.error(f"{text!r} contains a NUL byte")
    return (o.base / Path(text).expanduser()).absolute()


def _p_file(value: object, o: _Origin) -> Path | None:
    path = _p_path(value, o)
    if path is not None and not path.is_file():
        raise o.error(f"file {str(path)!r} does not exist", hint="fix the path")
    return path


def _p_list(value: object, o: _Origin) -> list[Any]:
    if o.textual and isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return list(tomllib.loads(f"v = {text}")["v"])
            except tomllib.TOMLDecodeError as exc:
                raise o.error(f"{value!r} is not a TOML array: {exc}") from exc
        return [item for item in re.split(r"[\s,]+", text) if item]
    if isinstance(value, tuple):
        value = list(value)
    _want(value, list, "an array", o)
    assert isinstance(value, list)
    return value


def _p_str_list(check: Callable[[str], None]) -> Callable[[object, _Origin], tuple[str, ...]]:
    def parse(value: object, o: _Origin) -> tuple[str, ...]:
        items = _p_list(value, o)
        for i, item in enumerate(items):
            sub = _Origin(f"{o.key}[{i}]", o.where, o.base, False)
            _want(item, str, "a string", sub)
            try:
                check(item)
            except ValueError as exc:
                raise sub.error(str(exc)) from exc
        return tuple(items)
    return parse


def _p_hex_repos(value: object, o: _Origin) -> tuple[HexRepository, ...]:
    items = _p_list(value, o)
    repos = []
    for i, item in enumerate(items):
        sub = _Origin(f"{o.key}[{i}]", o.where, o.base, False)
        _want(item, dict, "a table {name, url, public_key}", sub)
        assert isinstance(item, dict)
        unknown = set(item) - {"name", "url", "public_key"}
        if unknown:
            raise sub.error(f"unknown key {sorted(unknown)[0]!r}",
                            hint="hex repository keys are name, url, public_key")
        for needed in ("name", "url", "public_key"):
            if needed not in item:
                raise sub.error(f"missing {needed!r}")
            _want(item[needed], str, f"a string for {needed!r}", sub)
        pem = item["public_key"]
        if not pem.lstrip().startswith("-----BEGIN"):
            path = _p_file(pem, _Origin(f"{sub.key}.public_key", o.where, o.base, False))
            assert path is not None
            pem = path.read_text(encoding="utf-8", errors="replace")
        try:
            repos.append(HexRepository(item["name"], item["url"], pem))
        except ConfigError as exc:
            raise sub.error(exc.problem) from exc
    return tuple(repos)


def _p_secret(value: object, o: _Origin) -> Secret | None:
    text = _p_str(value, o)
    return Secret(text) if text else None


def _checked(
    parse: Callable[[object, _Origin], Any], check: Callable[[Any], Any]
) -> Callable[[object, _Origin], Any]:
    def run(value: object, o: _Origin) -> Any:
        parsed = parse(value, o)
        try:
            if parsed is not None:
                check(parsed)
        except ValueError as exc:
            raise o.error(str(exc)) from exc
        return parsed
    return run


#: Every key: dotted name -> parser. Dotted names live in a TOML table.
_KEYS: dict[str, Callable[[object, _Origin], Any]] = {
    "repo_url": _checked(_p_str, check_repo_url),
    "branch": _checked(_p_str, check_branch),
    "local_path": _p_path,
    "apps_dir": _checked(_p_str, check_apps_dir),
    "reconcile_interval": _p_duration,
    "profile": _checked(_p_str, check_name),
    "activator": _checked(_p_str, check_name),
    "hex_repositories": _p_hex_repos,
    "health.interval": _p_duration,
    "health.timeout": _p_duration,
    "require_signed_commits": _p_bool,
    "allowed_signers": _p_file,
    "gpg_keyring": _p_file,
    "allow_history_rewrite": _p_bool,
    "api_address": _checked(_p_str, split_address),
    "api_token": _p_secret,
    "api_token_env": _checked(_p_opt_str, check_env_name),
    "substituters": _p_str_list(lambda v: check_url(v, ("file", "http", "https"))),
    "trusted_public_keys": _p_str_list(check_public_key),
    "mesh_peers": _p_str_list(lambda v: check_url(v, ("http", "https"))),
    "git.username": _p_opt_str,
    "git.ssh_key": _p_file,
    "git.ssh_public_key": _p_file,
    "git.ssh_passphrase_env": _checked(_p_opt_str, check_env_name),
    "git.token_env": _checked(_p_opt_str, check_env_name),
    "git.known_hosts": _p_file,
    "git.ca_bundle": _p_file,
    "git.fetch_timeout": _p_duration,
    "git.fetch_max_bytes": _checked(_p_int, check_positive),
}
_TABLES = {"health", "git"}
_SECRET_KEYS = {"api_token"}


def env_var(key: str) -> str:
    """The environment variable overriding ``key`` (``health.interval`` ->
    ``BSTORE_HEALTH_INTERVAL``)."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def flag_name(key: str) -> str:
    """The command-line flag conventionally overriding ``key`` (``--health-interval``)."""
    return "--" + key.replace(".", "-").replace("_", "-")


def known_keys() -> tuple[str, ...]:
    """Every configuration key, dotted for keys of a table."""
    return tuple(_KEYS)


def config_path(
    explicit: str | Path | None = None, env: Mapping[str, str] | None = None,
    default: Path | None = None,
) -> Path | None:
    """The config file to read: ``--config``, else ``$BSTORE_CONFIG``, else ``default``
    when it exists, else none (the configuration then comes from env and flags)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    if default is not None and default.is_file():
        return default
    return None


def _suggest(key: str) -> str | None:
    close = difflib.get_close_matches(key, list(_KEYS) + sorted(_TABLES), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {str(path)!r}: {exc.strerror}",
            hint=f"check --config / ${CONFIG_ENV}", source=str(path),
        ) from exc
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text",
                          source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}",
                          source=str(path)) from exc
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key {key!r} in {path}: expected a table ([{key}]), got"
                    f" {_type_name(value)}", key=key, source=str(path),
                )
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    for key in flat:
        if key not in _KEYS:
            raise ConfigError(f"unknown config key {key!r} in {path}", hint=_suggest(key),
                              key=key, source=str(path))
    return flat


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    default_path: Path | None = None,
) -> Config:
    """Read, merge and validate the configuration (see the module docstring).

    ``overrides`` maps keys (``"repo_url"``, ``"health.interval"`` or
    ``"health_interval"``) to flag values; ``None`` values are ignored (flag not given).
    """
    env = os.environ if env is None else env
    file = config_path(path, env, default_path)
    cwd = Path.cwd()
    values: dict[str, Any] = {}
    origins: dict[str, _Origin] = {}
    if file is not None:
        file = file.absolute()
        for key, value in _read_file(file).items():
            origin = _Origin(key, str(file), file.parent, False, key in _SECRET_KEYS)
            values[key] = _KEYS[key](value, origin)
            origins[key] = origin
    for key, parse in _KEYS.items():
        name = env_var(key)
        if name in env:
            origin = _Origin(key, f"environment variable {name}", cwd, True, key in _SECRET_KEYS)
            values[key] = parse(env[name], origin)
            origins[key] = origin
    by_flat = {k.replace(".", "_"): k for k in _KEYS}
    for raw_key, value in (overrides or {}).items():
        if value is None:
            continue
        found = raw_key if raw_key in _KEYS else by_flat.get(raw_key.replace("-", "_"))
        if found is None:
            raise ConfigError(f"unknown config key {raw_key!r} in the command-line overrides",
                              hint=_suggest(raw_key), key=raw_key, source="command line")
        origin = _Origin(found, f"option {flag_name(found)}", cwd, isinstance(value, str),
                         found in _SECRET_KEYS)
        values[found] = _KEYS[found](value, origin)
        origins[found] = origin
    if "repo_url" not in values:
        where = f"{file}, " if file else ""
        raise ConfigError(
            f"config key 'repo_url' is required and is not set (looked in {where}"
            f"${env_var('repo_url')} and {flag_name('repo_url')})",
            hint="set repo_url in bstore.toml, or pass --config",
            key="repo_url", source=str(file) if file else None,
        )
    tables: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    top: dict[str, Any] = {}
    for key, value in values.items():
        table, dot, sub = key.partition(".")
        if dot:
            tables[table][sub] = value
        else:
            top[key] = value
    # The parsers checked each value; what remains are checks across keys, which the
    # dataclasses make. Re-aim their message at where the key named came from.
    try:
        return Config(**top, health=HealthDefaults(**tables["health"]),
                      git=GitSettings(**tables["git"]), source=file)
    except ConfigError as exc:
        culprit = origins.get(exc.key or "")
        if culprit is None:
            raise
        raise culprit.error(exc.problem, exc.hint) from exc
