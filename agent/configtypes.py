"""Building blocks shared by every configuration class.

Durations are written as ``"30s"``, ``"15m"``, ``"1h30m"``, ``"90d"`` and sizes as
``"512MiB"``; secrets come either inline or from a ``*_file`` key. Every section class
derives from :class:`Section`, which forbids unknown keys so that a typo is an error and
not a silently ignored setting.
"""

from __future__ import annotations

import contextvars
import grp
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(value: Any) -> float:
    """Parse ``"1h30m"``-style text (or a number of seconds) into seconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "invalid duration {value}", {"value": repr(value)})
    if isinstance(value, int | float):
        if value < 0:
            raise PydanticCustomError(
                "duration", "invalid duration {value}: must not be negative", {"value": repr(value)}
            )
        return float(value)
    if isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value.strip()))
    raise PydanticCustomError(
        "duration",
        "invalid duration {value} (write for example '30s', '15m', '1h30m', '90d')",
        {"value": repr(value)},
    )


def parse_size(value: Any) -> int:
    """Parse ``"512MiB"``-style text (or a number of bytes) into bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise PydanticCustomError(
        "size", "invalid size {value} (write for example '512MiB', '2GiB')", {"value": repr(value)}
    )


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for messages and status output."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out) or "0s"


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise PydanticCustomError(
            "duration",
            "must be greater than 0 (got {value}): a zero period or timeout cannot work",
            {"value": f"{seconds:g}s"},
        )
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in the config as ``"30s"``, ``"15m"``, ``"90d"``; 0 allowed."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""A period, interval or timeout: more than 0 seconds (``"0s"`` is a config error, never a
division by zero or a busy loop at run time)."""


def at_least(value: float, info: ValidationInfo, other: str) -> float:
    """For a field validator of a cap: ``value`` must not be below the field ``other``
    (declared before it; when that one is itself invalid, there is nothing to compare)."""
    floor = info.data.get(other)
    if isinstance(floor, int | float) and value < floor:
        raise ValueError(
            f"must be at least {other} ({format_duration(floor)}), got {format_duration(value)}"
        )
    return value


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written in the config as ``"512MiB"``."""


# Warnings found while loading (for example a world-readable secret file). The loader
# collects them so that `check-config` can print them and the daemon can log them.
load_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "load_warnings", default=None
)


def warn(message: str) -> None:
    """Record a configuration warning for the current load."""
    sink = load_warnings.get()
    if sink is not None:
        sink.append(message)


class SecretFile:
    """A secret read from a file named in the config (``token_file = "/etc/..."``)."""

    __slots__ = ("path", "value")

    def __init__(self, path: Path, value: SecretStr) -> None:
        self.path = path
        self.value = value

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"

    # Equal when path and content are: a reload then restarts a source with a secret file
    # only when the file's content (or its path) changed.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretFile):
            return NotImplemented
        return self.path == other.path and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.path)


def load_secret_file(value: Any) -> SecretFile:
    """Read a secret file; warn when group or others may read it."""
    if isinstance(value, SecretFile):
        return value
    if not isinstance(value, str | Path) or not str(value):
        raise PydanticCustomError(
            "secret_file", "expected a file path, got {value}", {"value": repr(value)}
        )
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8").strip()
        st = path.stat()
        mode = st.st_mode
    except OSError as exc:
        raise PydanticCustomError(
            "secret_file",
            "cannot read secret file {path}: {reason}",
            {"path": repr(str(path)), "reason": exc.strerror or str(exc)},
        ) from None
    if not text:
        raise PydanticCustomError(
            "secret_file", "secret file {path} is empty", {"path": repr(str(path))}
        )
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and not _service_group(st.st_gid)):
        warn(
            f"secret file {str(path)!r} is readable by group or others "
            f"(mode {stat.filemode(mode)}); run: chmod 600 {path} (or chgrp "
            f"{SERVICE_GROUP} {path} && chmod 640 {path})"
        )
    return SecretFile(path, SecretStr(text))


SERVICE_GROUP = "edge-agent"
"""The unit's ``Group=``: a secret readable by this group only is as intended
(``root:edge-agent 0640``, docs/operations.md)."""


def _service_group(gid: int) -> bool:
    try:
        return grp.getgrgid(gid).gr_name == SERVICE_GROUP
    except KeyError:
        return False


def _existing_file(value: Any) -> Any:
    if isinstance(value, str | Path) and str(value):
        path = Path(value)
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "does not exist"
            raise PydanticCustomError(
                "file", "file {path} {why}", {"path": repr(str(path)), "why": why}
            )
    return value


ExistingFile = Annotated[Path, BeforeValidator(_existing_file)]
"""A file the config names (a CA bundle, a certificate): it must exist when the config is
loaded, so check-config and a reload name the key instead of a connect failing later."""

SecretFilePath = Annotated[SecretFile, BeforeValidator(load_secret_file)]
"""A ``*_file`` key: the file is read when the config is loaded (and on every reload)."""


class Section(BaseModel):
    """Base of every config table: unknown keys are errors, and ``*_file`` secrets resolve.

    A field ``x_file: SecretFilePath | None`` beside ``x: SecretStr | None`` fills ``x``
    from the file; setting both is an error.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    @model_validator(mode="after")
    def _resolve_secret_files(self) -> Section:
        for name in type(self).model_fields:
            if not name.endswith("_file"):
                continue
            base = name.removesuffix("_file")
            holder = getattr(self, name)
            if base not in type(self).model_fields or not isinstance(holder, SecretFile):
                continue
            if getattr(self, base) is not None:
                raise PydanticCustomError(
                    "secret_conflict",
                    "set either '{base}' or '{base}_file', not both",
                    {"base": base},
                )
            object.__setattr__(self, base, holder.value)
        return self


def secret_value(secret: SecretStr | None) -> str | None:
    """The plain text of a secret, for the one place that needs it (a header, a DSN)."""
    return secret.get_secret_value() if secret is not None else None


def expand_path(value: str | os.PathLike[str]) -> Path:
    """A user path with ``~`` expanded."""
    return Path(value).expanduser()
