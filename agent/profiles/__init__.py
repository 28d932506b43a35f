"""Equipment profiles: point lists and fault-code tables shipped as data (docs/profiles.md).

A profile is a TOML file (``<name>.toml``) holding an equipment type's points, each with
how a Modbus device and an MQTT JSON payload carry it, and named code tables that map raw
state and fault codes to normalized codes and severities. A Modbus device or an MQTT
subscription references one with ``profile = "<name>"``; its own ``points`` override the
profile's by name. ``extends`` inherits another profile (a manufacturer's variant of a
generic lift, say) and replaces what it redefines: points by name, code tables by name.

Profiles are looked up in ``[agent] profile_dirs`` first (a site's own files, which may
also shadow a shipped profile), then among the profiles shipped in this package.
"""

from __future__ import annotations

import contextvars
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from agent.codes import Code, Severity
from agent.configtypes import Section
from agent.rbe import ReportByException

BUILTIN_DIR = Path(__file__).parent

# Extra directories searched before the shipped profiles; set while a config file is
# validated (from ``agent.profile_dirs``), so source configs can expand their profiles.
search_dirs: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar(
    "profile_search_dirs", default=()
)


class ProfileError(ValueError):
    """A profile is unknown or malformed; the message names the file and key."""


class ProfilePoint(Section):
    """One point of a profile (``[[points]]`` in a profile file)."""

    name: str = Field(min_length=1)
    """Point name (the records' ``data.point``; rules refer to it)."""
    description: str = ""
    """What the point means."""
    unit: str | None = None
    """Engineering unit."""
    kind: Literal["reading", "state", "fault"] = "reading"
    """``reading``: meter readings. ``state``/``fault``: events when the value changes,
    translated through the code table ``codes``."""
    codes: str | None = None
    """Name of a code table of this profile (``[codes.<name>]``)."""
    unknown_severity: Severity = "warning"
    """Severity of a code missing from the table."""
    rbe: ReportByException | None = None
    """Report-by-exception (default for state/fault points: on change)."""
    modbus: dict[str, Any] | None = None
    """Where a Modbus device holds it: ``table``, ``address``, ``type``, ``bit``, ``order``,
    ``scale``, ``offset``... (as in a Modbus point). Absent: not available over Modbus."""
    mqtt: dict[str, Any] | None = None
    """Where an MQTT JSON payload holds it: ``path``, ``type``, ``scale``, ``quality_path``...
    (as in an MQTT point). Absent: not available over MQTT."""


class Profile(Section):
    """A profile file."""

    name: str
    """Profile name; must match the file name without ``.toml``."""
    description: str = ""
    """What equipment it describes."""
    equipment: str = "other"
    """Equipment type (``lift``, ``escalator``...), stamped on nothing; for people."""
    extends: str | None = None
    """Name of a profile this one builds on."""
    modbus_address_base: Literal[0, 1] = 0
    """Whether the Modbus addresses below count from 0 or 1."""
    codes: dict[str, dict[str, Code]] = Field(default_factory=dict)
    """Code tables: ``[codes.fault]`` ``"17" = { code = "door_lock_fault", ... }``."""
    points: list[ProfilePoint] = Field(default_factory=list)
    """The points."""

    @model_validator(mode="after")
    def _check(self) -> Profile:
        names = [p.name for p in self.points]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate point name(s) {dupes}")
        return self


def _find(name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ProfileError(f"invalid profile name {name!r}")
    dirs = [*search_dirs.get(), BUILTIN_DIR]
    for folder in dirs:
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    known = sorted(available())
    raise ProfileError(
        f"unknown profile {name!r} (searched {', '.join(str(d) for d in dirs)}; "
        f"available: {', '.join(known) or 'none'})"
    )


def available() -> dict[str, Path]:
    """Every profile name that can be referenced, and its file (site files first)."""
    found: dict[str, Path] = {}
    for folder in [*search_dirs.get(), BUILTIN_DIR]:
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


_cache: dict[tuple[Path, int], Profile] = {}


def _read(path: Path) -> Profile:
    key = (path, path.stat().st_mtime_ns)
    if key in _cache:
        return _cache[key]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile file {path}: invalid TOML: {exc}") from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ProfileError(f"profile file {path}: {_loc(first['loc'])}: {msg}") from None
    if profile.name != path.stem:
        raise ProfileError(f"profile file {path}: name {profile.name!r} must be {path.stem!r}")
    _cache[key] = profile
    return profile


def load(name: str, _chain: tuple[str, ...] = ()) -> Profile:
    """The profile ``name`` with ``extends`` resolved and every point checked against the
    Modbus and MQTT point schemas. Raises :class:`ProfileError`."""
    path = _find(name)
    if name in _chain:
        raise ProfileError(
            f"profile file {path}: profile {name!r} extends itself ({' -> '.join((*_chain, name))})"
        )
    profile = _read(path)
    if profile.extends is not None:
        base = load(profile.extends, (*_chain, name))
        if base.modbus_address_base != profile.modbus_address_base:
            raise ProfileError(f"profile file {path}: modbus_address_base differs from base")
        points = merge(base.points, profile.points)
        codes = {**base.codes, **profile.codes}
        profile = profile.model_copy(update={"points": points, "codes": codes, "extends": None})
    if not _chain:
        _check_points(profile, path)
    return profile


def _check_points(profile: Profile, path: Path) -> None:
    for i, point in enumerate(profile.points):
        if point.codes is not None and point.codes not in profile.codes:
            raise ProfileError(
                f"profile file {path}: points.{i}.codes: no code table {point.codes!r} "
                f"(have: {', '.join(sorted(profile.codes)) or 'none'})"
            )
        for proto, convert in (("modbus", modbus_point), ("mqtt", mqtt_point)):
            if getattr(point, proto) is None:
                continue
            try:
                convert(profile, point, 0)
            except ValidationError as exc:
                first = exc.errors()[0]
                msg = str(first["msg"]).removeprefix("Value error, ")
                where = f"points.{i}.{proto}" + (f".{_loc(first['loc'])}" if first["loc"] else "")
                raise ProfileError(f"profile file {path}: {where}: {msg}") from None


def _common(profile: Profile, point: ProfilePoint) -> dict[str, Any]:
    out: dict[str, Any] = {"name": point.name, "unit": point.unit}
    if point.codes is not None:
        out["codes"] = profile.codes[point.codes]
        out["unknown_severity"] = point.unknown_severity
    if point.rbe is not None:
        out["rbe"] = point.rbe
    return out


def modbus_point(profile: Profile, point: ProfilePoint, address_base: int) -> Any:
    """The Modbus point config of a profile point, for a device counting from
    ``address_base``."""
    from agent.sources.modbus.config import PointConfig  # noqa: PLC0415 - no import cycle

    assert point.modbus is not None
    data = {**_common(profile, point), "kind": point.kind, **point.modbus}
    if isinstance(data.get("address"), int):
        data["address"] += address_base - profile.modbus_address_base
    return PointConfig.model_validate(data)


def mqtt_point(profile: Profile, point: ProfilePoint, _: int = 0) -> Any:
    """The MQTT point config of a profile point (points of JSON payloads are optional)."""
    from agent.sources.mqtt.config import PointConfig  # noqa: PLC0415 - no import cycle

    assert point.mqtt is not None
    data: dict[str, Any] = {**_common(profile, point), "optional": True, **point.mqtt}
    if point.kind != "reading":
        data.setdefault("entity", "event")
        data.setdefault("event_field", "code" if point.kind == "fault" else "state")
        data.setdefault("rbe", ReportByException())
    return PointConfig.model_validate(data)


def points_for(name: str, protocol: Literal["modbus", "mqtt"], address_base: int = 0) -> list[Any]:
    """The points of profile ``name`` that ``protocol`` carries, as that source's point
    configs. Raises :class:`ProfileError`."""
    profile = load(name)
    convert = modbus_point if protocol == "modbus" else mqtt_point
    return [convert(profile, p, address_base) for p in profile.points if getattr(p, protocol)]


def merge(profile_points: list[Any], explicit: list[Any]) -> list[Any]:
    """Profile points overridden by explicit points of the same name, then the others."""
    mine = {p.name: p for p in explicit}
    merged = [mine.pop(p.name, p) for p in profile_points]
    return merged + [p for p in explicit if p.name in mine]


@contextmanager
def searching(dirs: list[Path]) -> Iterator[None]:
    """Search ``dirs`` (before the shipped profiles) while the block runs."""
    token = search_dirs.set(tuple(dirs))
    try:
        yield
    finally:
        search_dirs.reset(token)


def check_dirs(dirs: list[Path]) -> list[Path]:
    """Every profile file in ``dirs`` must load (check-config reports a broken one even
    when nothing references it yet)."""
    with searching(dirs):
        for folder in dirs:
            if not folder.is_dir():
                raise ProfileError(f"profile directory {folder} does not exist")
            for path in sorted(folder.glob("*.toml")):
                load(path.stem)
    return dirs
