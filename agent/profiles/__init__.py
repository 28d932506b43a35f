"""Equipment profiles: point lists and fault-code tables shipped as data (docs/profiles.md).

A profile is a TOML file (``<name>.toml``) holding an equipment type's points, each with
how a Modbus device and an MQTT JSON payload carry it, and named code tables that map raw
state and fault codes to normalized codes and severities. A Modbus device or an MQTT
subscription references one with ``profile = "<name>"``; its own ``points`` override the
profile's by name. ``extends`` inherits another profile (a manufacturer's variant of a
generic lift, say) and replaces what it redefines: points by name, code tables by name.

Profiles are looked up in ``[agent] profile_dirs`` first (a site's own files, which may
also shadow a shipped profile), then among the profiles shipped in this package.

This module knows no source type. A point says how each source type carries it in a
table named after that type (``modbus = {...}``, ``mqtt = {...}``: :attr:`ProfilePoint.
carriers`); the source plugin that reads profiles converts such a table, with
:func:`common`, into its own point config (its ``SourcePlugin.profile_point``), and
:func:`convert` names the profile file and key of a table that does not fit.
"""

from __future__ import annotations

import contextvars
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, PrivateAttr, ValidationError, model_validator

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
    carriers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """How each source type carries the point, one table per type, written as a key of
    the point: ``modbus = { table, address, type, bit, order, scale, offset... }`` (as in
    a Modbus point), ``mqtt = { path, type, scale, quality_path... }`` (as in an MQTT
    point). A source type without a table does not get the point."""

    @model_validator(mode="before")
    @classmethod
    def _gather_carriers(cls, data: Any) -> Any:
        # ``modbus = {...}`` in the file: every table-valued key that is not a field of
        # the point is a source type's table (an unknown type is refused by check_dirs)
        if not isinstance(data, dict):
            return data
        tables = {
            k: v for k, v in data.items() if k not in cls.model_fields and isinstance(v, dict)
        }
        if not tables:
            return data
        rest = {k: v for k, v in data.items() if k not in tables}
        return {**rest, "carriers": {**rest.get("carriers", {}), **tables}}

    def carried_by(self, carrier: str) -> dict[str, Any] | None:
        """The table of source type ``carrier``; None when it does not carry the point."""
        return self.carriers.get(carrier)


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
    _path: Path | None = PrivateAttr(default=None)

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
    profile._path = path
    _cache[key] = profile
    return profile


def load(name: str, _chain: tuple[str, ...] = ()) -> Profile:
    """The profile ``name`` with ``extends`` resolved and its code table references
    checked. Raises :class:`ProfileError`. (Whether a source type's table of a point
    fits that type's point config is the plugin's to say: :func:`convert`,
    :func:`check_dirs`.)"""
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
        profile._path = path
    if not _chain:
        _check_codes(profile, path)
    return profile


def _check_codes(profile: Profile, path: Path) -> None:
    for i, point in enumerate(profile.points):
        if point.codes is not None and point.codes not in profile.codes:
            raise ProfileError(
                f"profile file {path}: points.{i}.codes: no code table {point.codes!r} "
                f"(have: {', '.join(sorted(profile.codes)) or 'none'})"
            )


def common(profile: Profile, point: ProfilePoint) -> dict[str, Any]:
    """What every source type's point config takes of a profile point: name, unit, the
    code table (resolved) with its unknown severity, report-by-exception."""
    out: dict[str, Any] = {"name": point.name, "unit": point.unit}
    if point.codes is not None:
        out["codes"] = profile.codes[point.codes]
        out["unknown_severity"] = point.unknown_severity
    if point.rbe is not None:
        out["rbe"] = point.rbe
    return out


P = TypeVar("P")

Converter = Callable[[Profile, ProfilePoint], object]
"""A source type's ``profile_point``: one profile point as its point config; raises
:class:`pydantic.ValidationError` (or ValueError) when the point's table does not fit."""


def convert(
    profile: Profile, carrier: str, fn: Callable[[Profile, ProfilePoint], P]
) -> list[P]:
    """Every point of ``profile`` that source type ``carrier`` carries, converted by
    ``fn``. Raises :class:`ProfileError` naming the file and key of a table that does not
    fit (``points.3.modbus.address: ...``)."""
    out: list[P] = []
    for i, point in enumerate(profile.points):
        if point.carried_by(carrier) is None:
            continue
        try:
            out.append(fn(profile, point))
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = str(first["msg"]).removeprefix("Value error, ")
            where = f"points.{i}.{carrier}" + (f".{_loc(first['loc'])}" if first["loc"] else "")
            raise ProfileError(f"profile file {profile._path}: {where}: {msg}") from None
        except ValueError as exc:
            where = f"points.{i}.{carrier}"
            raise ProfileError(f"profile file {profile._path}: {where}: {exc}") from None
    return out


def _check_carriers(profile: Profile, carriers: Mapping[str, Converter]) -> None:
    for i, point in enumerate(profile.points):
        for carrier in point.carriers:
            if carrier not in carriers:
                raise ProfileError(
                    f"profile file {profile._path}: points.{i}.{carrier}: no source type "
                    f"reads profile points from {carrier!r} (have: {', '.join(carriers)})"
                )
    for carrier, fn in carriers.items():
        convert(profile, carrier, fn)


def _name(point: Any) -> Any:
    return point.get("name") if isinstance(point, dict) else point.name


def merge(profile_points: list[Any], explicit: list[Any]) -> list[Any]:
    """Profile points overridden by explicit points of the same name, then the others.
    Explicit points may still be raw tables (a ``mode="before"`` validator merges)."""
    mine = {_name(p): p for p in explicit}
    merged = [mine.pop(_name(p), p) for p in profile_points]
    return merged + [p for p in explicit if _name(p) in mine]


@contextmanager
def searching(dirs: list[Path]) -> Iterator[None]:
    """Search ``dirs`` (before the shipped profiles) while the block runs."""
    token = search_dirs.set(tuple(dirs))
    try:
        yield
    finally:
        search_dirs.reset(token)


def check_dirs(dirs: list[Path], carriers: Mapping[str, Converter]) -> list[Path]:
    """Every profile file in ``dirs`` must load, and every source type's table of its
    points fit that type (``carriers``: each source type that reads profiles, and its
    converter), so check-config reports a broken file even when nothing references it
    yet."""
    with searching(dirs):
        for folder in dirs:
            if not folder.is_dir():
                raise ProfileError(f"profile directory {folder} does not exist")
            for path in sorted(folder.glob("*.toml")):
                _check_carriers(load(path.stem), carriers)
    return dirs
