"""The settings root: one TOML file, environment overrides, secrets from files.

Precedence, highest first: environment (``EDGE_AGENT_<SECTION>__<KEY>``), then the TOML
file. Each section's class lives beside the code it configures (outbox, sink, each source
plugin) and forbids unknown keys, so a typo is an error with its key path, never a
silently ignored setting. :func:`load` is what the daemon, ``check-config`` and reload use.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent import profiles
from agent import sources as source_plugins
from agent.configtypes import PositiveDuration, SecretFilePath, Section, load_warnings, warn
from agent.errors import ConfigError
from agent.outbox import OutboxConfig
from agent.sinks import base as sinks
from agent.sources.base import SourceConfig

DEFAULT_PATH = Path("/etc/edge-agent/config.toml")
ENV_PREFIX = "EDGE_AGENT_"


class AgentSection(Section):
    """Who this agent is (``[agent]``)."""

    id: str = Field(default_factory=socket.gethostname, min_length=1)
    """Agent id sent upstream with every batch. Default: the host name."""
    site: str | None = None
    """Default site stamped on records (a source can override it)."""
    state_dir: Path = Path("/var/lib/edge-agent")
    """Where the outbox and other state live (systemd's StateDirectory)."""
    profile_dirs: list[Path] = Field(default_factory=list)
    """Directories of site equipment profiles (``<name>.toml``), searched before the
    shipped ones (docs/profiles.md). Every file in them must be a valid profile."""

    @field_validator("profile_dirs")
    @classmethod
    def _check_profiles(cls, value: list[Path]) -> list[Path]:
        return profiles.check_dirs(value, source_plugins.profile_carriers())


class LoggingSection(Section):
    """Logging (``[logging]``)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level logged."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: readable on a terminal, JSON otherwise (journald)."""


class ApiSection(Section):
    """The local API (``[api]``): health, status, metrics, manual sync."""

    enabled: bool = True
    """Serve the local API."""
    listen: str = "127.0.0.1:8470"
    """``host:port``. Binding beyond loopback requires ``token``."""
    token: SecretStr | None = None
    """Bearer token for mutations (``POST /v1/sources/{name}/sync``)."""
    token_file: SecretFilePath | None = None
    """File holding the API token."""
    ready_max_oldest_age: PositiveDuration = 3600.0
    """/readyz reports not ready when the oldest undelivered record is older than this."""
    ready_crash_loop_restarts: int = Field(default=5, ge=1)
    """A source restarted this many times within ``ready_crash_loop_window`` crash-loops:
    it is ``failed`` and /readyz not ready, even while it runs between two crashes."""
    ready_crash_loop_window: PositiveDuration = 600.0
    """The window of ``ready_crash_loop_restarts``."""
    horizon_warn: PositiveDuration = 86400.0
    """/readyz warns (it stays ready) while the buffer horizon - how long the outbox can
    buffer through an upstream outage at the ingest rate of the last hour before it must
    block or drop - is shorter than this. Default one day."""
    horizon_min_sample: PositiveDuration = 600.0
    """The buffer horizon says ``measuring`` (and /readyz does not warn) until this much
    of the ingest rate is measured since start (the rates are kept in memory only)."""
    require_token_for_reads: bool = False
    """Reads (``/readyz``, ``/v1/status``, ``/v1/sync-status``, ``/metrics``) need the
    bearer token too; ``/healthz`` stays open for liveness probes (it tells nothing but
    "the loop turns"). ``edge-agent status`` sends the token from this file."""

    @model_validator(mode="after")
    def _reads_need_a_token(self) -> ApiSection:
        if self.require_token_for_reads and self.token is None:
            raise ValueError("require_token_for_reads needs api.token or api.token_file")
        return self

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> ApiSection:
        host = self.listen.rpartition(":")[0].strip("[]")
        if self.enabled and self.token is None and not _is_loopback(host):
            raise ValueError(
                f"api.listen {self.listen!r} is not a loopback address: set api.token "
                "(or api.token_file) before exposing the local API"
            )
        return self

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid listen address {value!r} (write host:port)")
        return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _source_union() -> Any:
    classes = source_plugins.config_classes()
    if not classes:
        return SourceConfig
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]  # noqa: UP007


if TYPE_CHECKING:  # what the rest of the agent may rely on: the common base
    SourceUnion = SourceConfig
else:
    SourceUnion = _source_union()


def _upstream_type(value: Any) -> str:
    """The sink type of an ``[upstream]`` table: ``type``, default ``http``."""
    if isinstance(value, dict):
        return str(value.get("type", sinks.DEFAULT_TYPE))
    return str(value.type) if isinstance(value, sinks.UpstreamConfig) else ""


def upstream_union(classes: Sequence[type[sinks.UpstreamConfig]]) -> Any:
    """``[upstream]``'s type: the sink config classes, told apart by ``type`` (absent:
    ``http``, so every config written before sinks were plugins still loads)."""
    if len(classes) == 1:
        return classes[0]
    tagged = [Annotated[c, Tag(str(c.model_fields["type"].default))] for c in classes]
    return Annotated[Union[tuple(tagged)], Discriminator(_upstream_type)]  # noqa: UP007


if TYPE_CHECKING:
    UpstreamUnion = sinks.UpstreamConfig
else:
    UpstreamUnion = upstream_union([p.config_class for p in sinks.sink_plugins()])


class Settings(BaseSettings):
    """The whole configuration file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    agent: AgentSection = AgentSection()
    logging: LoggingSection = LoggingSection()
    outbox: OutboxConfig = OutboxConfig()
    upstream: UpstreamUnion
    api: ApiSection = ApiSection()
    sources: dict[str, SourceUnion] = {}

    @field_validator("sources")
    @classmethod
    def _check_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"invalid source name {name!r}: use letters, digits, '_' and '-'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init data; the environment overrides it.
        return (env_settings, init_settings)

    def outbox_path(self) -> Path:
        """Where the outbox database lives."""
        return self.outbox.path or self.agent.state_dir / "outbox.db"


def config_path(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The config file: ``--config``, else ``$EDGE_AGENT_CONFIG``, else the default."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("EDGE_AGENT_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def _loc(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """A dotted key path, without pydantic's union tags (``sources.x.mqtt.port``)."""
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "sources":
        kind = data.get("sources", {}).get(parts[1], {})
        if isinstance(kind, dict) and kind.get("type") == parts[2]:
            del parts[2]
    if (
        len(parts) >= 2
        and parts[0] == "upstream"
        and parts[1] == _upstream_type(data.get("upstream"))
    ):
        del parts[1]
    return ".".join(p for p in parts if not p.startswith(("function-", "json-or-python")))


def _error_key(err: Any, data: dict[str, Any]) -> str:
    """The key path of one validation error; an unknown sink type is ``upstream.type``
    (with several sinks, pydantic reports it on the table)."""
    if err["type"] == "union_tag_invalid" and tuple(err["loc"]) == ("upstream",):
        return "upstream.type"
    return _loc(err["loc"], data)


_SECRET_KEYS = ("token", "password", "secret", "api_key", "apikey")


def _is_secret_key(loc: tuple[int | str, ...]) -> bool:
    return any(s in str(p).lower() for p in loc for s in _SECRET_KEYS)


def _message(err: Any) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against config.example.toml)"
    if kind == "missing":
        return "required key is missing"
    if kind in {"duration", "size", "secret_file", "secret_conflict", "file"}:
        return str(msg)
    if kind == "union_tag_invalid" or (kind == "literal_error" and _is_type_key(err["loc"])):
        return _unknown_type(err["loc"], value)
    if kind == "union_tag_not_found":
        return "missing 'type' (one of: " + ", ".join(source_plugins.source_types()) + ")"
    msg = str(msg).removeprefix("Value error, ")
    if _is_secret_key(err["loc"]):  # e.g. `password = 123456` unquoted: never echo it
        return msg
    if isinstance(value, str | int | float | bool) and not kind.startswith("value_error"):
        return f"{msg} (got {value!r})"
    return msg


def _is_type_key(loc: tuple[int | str, ...]) -> bool:
    """Whether ``loc`` is ``upstream.type`` or ``sources.<name>.type`` (a plugin choice)."""
    return (loc[:1] == ("upstream",) and loc[-1:] == ("type",) and len(loc) <= 3) or (
        loc[:1] == ("sources",) and loc[-1:] == ("type",) and len(loc) <= 4
    )


def _unknown_type(loc: tuple[int | str, ...], value: Any) -> str:
    """``unknown upstream type 'x' (one of: http)`` for a type no plugin registers."""
    given = value.get("type") if isinstance(value, dict) else value
    if loc[:1] == ("upstream",):
        return f"unknown upstream type {given!r} (one of: {', '.join(sinks.SINKS)})"
    return f"unknown source type {given!r}"


def _profile_dirs(data: dict[str, Any]) -> list[Path]:
    """``agent.profile_dirs`` as written (validated with the rest), for profile lookups."""
    agent = data.get("agent")
    dirs = agent.get("profile_dirs") if isinstance(agent, dict) else None
    if not isinstance(dirs, list):
        return []
    return [Path(d).expanduser() for d in dirs if isinstance(d, str)]


Check = Callable[["Settings"], list[tuple[str, str]]]


def parse(
    data: dict[str, Any], source: str | None = None, checks: Sequence[Check] = ()
) -> tuple[Settings, list[str]]:
    """Validate config data; return the settings and any warnings, or raise ConfigError.

    ``checks`` run on valid settings with the cross-source checks, and their problems are
    reported together (check-config adds the machine's: :mod:`agent.preflight`).
    """
    warnings: list[str] = []
    token = load_warnings.set(warnings)
    try:
        with profiles.searching(_profile_dirs(data)):
            settings = Settings(**data)
        problems = across_sources(settings)
        for check in checks:
            problems += check(settings)
    except ValidationError as exc:
        problems = [(_error_key(e, data), _message(e)) for e in exc.errors()]
        raise ConfigError(problems, source) from None
    finally:
        load_warnings.reset(token)
    if problems:
        raise ConfigError(problems, source)
    return settings, warnings


def across_sources(settings: Settings) -> list[tuple[str, str]]:
    """What no single table can see: each source's own cross-table problems (rules on
    points it lacks) and settings two enabled sources must not share (MQTT client ids)."""
    problems: list[tuple[str, str]] = []
    owners: dict[tuple[Any, ...], str] = {}
    configured: dict[str, SourceConfig] = settings.sources
    for name, conf in configured.items():
        found = [(f"sources.{name}.{key}", msg) for key, msg in conf.problems()]
        if not conf.enabled:
            # Validated, not started: what would fail at its start is for later.
            for key, msg in found:
                warn(f"{key}: {msg} (the source is disabled: fix this before enabling it)")
            continue
        problems += found
        for key, unique in conf.unique_keys().items():
            other = owners.setdefault(unique.identity, name)
            if other != name:
                problems.append(
                    (
                        f"sources.{name}.{key}",
                        f"{key} {unique.shown} is also used by source {other!r}: "
                        f"{unique.why}; give each source its own",
                    )
                )
    for key, unique in settings.upstream.unique_keys().items():
        if unique.identity in owners:
            problems.append(
                (
                    f"upstream.{key}",
                    f"{key} {unique.shown} is also used by source "
                    f"{owners[unique.identity]!r}: {unique.why}; give the upstream its own",
                )
            )
    return problems


def load(path: str | os.PathLike[str], checks: Sequence[Check] = ()) -> tuple[Settings, list[str]]:
    """Read and validate a config file. Raises ConfigError naming every problem."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([("", f"cannot read config file: {exc.strerror}")], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"invalid TOML: {exc}")], str(path)) from None
    return parse(data, str(path), checks)
