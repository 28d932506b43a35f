"""Checks of the machine a valid config will run on: files, the state directory, the
service user. What :func:`agent.config.load` cannot see from the file alone.

``edge-agent check-config`` runs every check; ``edge-agent run`` runs the ones that would
otherwise end in a traceback at start (an unwritable ``state_dir``, a missing SQLite
file), so a wrong path is one line naming its key, never a crash loop.

The service user. The service does not run as whoever types ``check-config`` (root,
usually), so a file root can read may still be unreadable for it. The view of the service
comes from the unit systemd would start (:func:`ServiceView.from_system`):
``/etc/systemd/system/edge-agent.service``, else ``/lib/systemd/system/...`` (the .deb's),
plus drop-ins in ``edge-agent.service.d/*.conf``; from it ``User=``, ``Group=``,
``SupplementaryGroups=``, ``DynamicUser=``, ``ProtectHome=``, ``PrivateTmp=``,
``ProtectSystem=``, ``StateDirectory=`` and ``ReadWritePaths=``. The user's uid and groups
come from ``/etc/passwd`` and ``/etc/group``. Permission bits are checked along the whole
path (every directory needs ``x``). A ``DynamicUser=`` has no fixed uid: only what
``others`` or its ``SupplementaryGroups=`` may read counts. Without an installed unit (a
development machine) the service checks are skipped, and the report says so.
"""

from __future__ import annotations

import configparser
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.configtypes import SecretFile, warn

UNIT = "edge-agent.service"
UNIT_DIRS = ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")
_HOME_DIRS = ("/home", "/root", "/run/user")
_TMP_DIRS = ("/tmp", "/var/tmp")  # noqa: S108 - named to warn about them, not used

Problem = tuple[str, str]


@dataclass
class ServiceView:
    """What the service user may read and write, from its unit and the user database."""

    user: str
    uid: int | None
    gids: set[int]
    unit_file: Path
    protect_home: bool = False
    private_tmp: bool = False
    protect_system_strict: bool = False
    writable: list[Path] = field(default_factory=list)

    @classmethod
    def from_system(cls, root: Path = Path("/")) -> ServiceView | None:
        """The installed unit's view, or None when no unit is installed under ``root``."""
        unit = next((root / d / UNIT for d in UNIT_DIRS if (root / d / UNIT).is_file()), None)
        if unit is None:
            return None
        settings = _unit_settings([unit, *sorted(unit.parent.glob(f"{UNIT}.d/*.conf"))])
        dropins = root / "etc/systemd/system" / f"{UNIT}.d"
        if dropins.is_dir() and dropins != unit.parent / f"{UNIT}.d":
            settings.update(_unit_settings(sorted(dropins.glob("*.conf"))))
        dynamic = _yes(settings.get("dynamicuser", "no"))
        user = settings.get("user", "" if dynamic else "root")
        passwd = _table(root / "etc/passwd")
        groups = _table(root / "etc/group")
        uid: int | None = None
        gids: set[int] = set()
        # passwd: name:x:uid:gid:...; group: name:x:gid:member,member
        if not dynamic and user in passwd:
            uid = int(passwd[user][2])
            gids.add(int(passwd[user][3]))
            gids |= {int(g[2]) for g in groups.values() if user in g[3].split(",")}
        for name in [settings.get("group", ""), *settings.get("supplementarygroups", "").split()]:
            if name in groups:
                gids.add(int(groups[name][2]))
        state = settings.get("statedirectory", "").split()
        writable = [Path("/var/lib") / d for d in state]
        writable += [Path(p.lstrip("-")) for p in settings.get("readwritepaths", "").split()]
        return cls(
            user=user or "(dynamic user)",
            uid=uid,
            gids=gids,
            unit_file=unit,
            protect_home=_yes(settings.get("protecthome", "no")),
            private_tmp=_yes(settings.get("privatetmp", "no")),
            protect_system_strict=settings.get("protectsystem", "") == "strict",
            writable=writable,
        )

    def may(self, path: Path, want: int) -> bool:
        """Whether the service user may ``want`` (``os.R_OK``...) ``path``: every parent
        directory searchable, the path itself as wanted."""
        if self.uid == 0:
            return True
        parts = [*reversed(path.parents), path]
        for i, part in enumerate(parts):
            try:
                st = part.stat()
            except OSError:
                return False
            need = want if i == len(parts) - 1 else os.X_OK
            if not self._allowed(st, need):
                return False
        return True

    def _allowed(self, st: os.stat_result, want: int) -> bool:
        bits = {os.R_OK: 4, os.W_OK: 2, os.X_OK: 1}
        mode = st.st_mode
        for flag, bit in bits.items():
            if not want & flag:
                continue
            if self.uid is not None and st.st_uid == self.uid:
                ok = mode & (bit << 6)
            elif st.st_gid in self.gids:
                ok = mode & (bit << 3)
            else:
                ok = mode & bit
            if not ok:
                return False
        return True

    def hidden(self, path: Path) -> str | None:
        """Why the unit's sandbox hides ``path`` from the service, or None."""
        text = str(path)
        if self.protect_home and any(_under(text, d) for d in _HOME_DIRS):
            return "ProtectHome=yes hides /home, /root and /run/user from the service"
        if self.private_tmp and any(_under(text, d) for d in _TMP_DIRS):
            return "PrivateTmp=yes gives the service its own empty /tmp and /var/tmp"
        return None


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _yes(value: str) -> bool:
    return value.strip().lower() in {"yes", "true", "1", "on", "read-only", "tmpfs"}


def _unit_settings(files: list[Path]) -> dict[str, str]:
    """``[Service]`` settings of a unit and its drop-ins (lower-case keys; later wins,
    an empty assignment resets)."""
    out: dict[str, str] = {}
    for path in files:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        if parser.has_section("Service"):
            out.update(parser.items("Service"))
    return out


def _table(path: Path) -> dict[str, list[str]]:
    """``/etc/passwd`` or ``/etc/group`` as name -> fields."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    rows = [line.split(":") for line in lines if line and not line.startswith("#")]
    return {r[0]: r for r in rows if len(r) >= 4}


# ------------------------------------------------------------------------------- files


def named_files(settings: Any) -> list[tuple[str, Path]]:
    """Every file or directory the config names, with its key path: ``*_file`` and
    ``*_dirs`` settings, secret files, and what sources name (a SQLite database)."""
    found: list[tuple[str, Path]] = []
    _walk(settings, (), found)
    for name, conf in settings.sources.items():
        found += [(f"sources.{name}.{key}", path) for key, path in conf.files().items()]
    return [(k, p) for k, p in found if k not in {"agent.state_dir", "outbox.path"}]


def _walk(node: Any, path: tuple[str, ...], found: list[tuple[str, Path]]) -> None:
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            _walk(getattr(node, name), (*path, name), found)
    elif isinstance(node, SecretFile):
        found.append((".".join(path), node.path))
    elif isinstance(node, Path):
        found.append((".".join(path), node))
    elif isinstance(node, dict):
        for key, value in node.items():
            _walk(value, (*path, str(key)), found)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _walk(value, (*path, str(i)), found)


def _missing(path: Path, directory: bool) -> str | None:
    """Why ``path`` cannot be used by this process (missing, wrong kind, unreadable)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()}; systemd runs in /)"
        return f"{str(path)!r} does not exist{where}"
    except OSError as exc:
        return f"cannot access {str(path)!r}: {exc.strerror}"
    if directory != stat.S_ISDIR(st.st_mode):
        return f"{str(path)!r} is {'not ' if directory else ''}a directory"
    if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
        return f"{str(path)!r} is not readable (by uid {os.geteuid()})"
    return None


def _unwritable(path: Path, what: str) -> str | None:
    """Why the directory ``path`` can neither be written nor created, or None."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{what} {str(path)!r} cannot be created: {str(probe)!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "is not writable" if probe == path else f"cannot be created in {str(probe)!r}"
        return f"{what} {str(path)!r} {verb} (by uid {os.geteuid()})"
    return None


def start_problems(settings: Any) -> list[Problem]:
    """What would fail at start: the state directory and outbox, and the files the
    config names (checked as this process, which under systemd is the service user)."""
    problems: list[Problem] = []
    if (why := _unwritable(settings.agent.state_dir, "state directory")) is not None:
        problems.append(("agent.state_dir", why))
    if settings.outbox.path is not None:
        target = settings.outbox.path
        if target.is_dir():
            problems.append(("outbox.path", f"{str(target)!r} is a directory, not a file"))
        elif (why := _unwritable(target.parent, "outbox directory")) is not None:
            problems.append(("outbox.path", why))
    disabled = {f"sources.{n}." for n, conf in settings.sources.items() if not conf.enabled}
    for key, path in named_files(settings):
        directory = key.split(".")[-2:-1] == ["profile_dirs"] or key.endswith("_dir")
        if (why := _missing(path, directory)) is None:
            continue
        if key.startswith(tuple(disabled)):
            warn(f"{key}: {why} (the source is disabled: fix this before enabling it)")
        else:
            problems.append((key, why))
    return problems


def service_warnings(settings: Any, config_file: Path | None, view: ServiceView) -> list[str]:
    """What the service user (not whoever runs check-config) could not read or write."""
    out: list[str] = []
    who = f"the service user {view.user}" + (f" (uid {view.uid})" if view.uid is not None else "")
    files = named_files(settings)
    if config_file is not None:
        files.insert(0, ("(config file)", config_file.resolve()))
    for key, path in files:
        if not path.exists():
            continue  # reported already (a problem, or a disabled source's warning)
        directory = path.is_dir()
        if (why := view.hidden(path)) is not None:
            out.append(f"{key}: {str(path)!r} is invisible to the service: {why}")
        elif not view.may(path, os.R_OK | (os.X_OK if directory else 0)):
            st = path.stat()
            out.append(
                f"{key}: {who} cannot read {str(path)!r} (mode {stat.filemode(st.st_mode)}, "
                f"owner {st.st_uid}:{st.st_gid}; checked against {view.unit_file}): "
                f"chgrp {view.user} {path} && chmod g+r{'x' if directory else ''} {path}"
            )
    for key, path in _state_paths(settings):
        if view.protect_system_strict and not any(_under(str(path), str(w)) for w in view.writable):
            allowed = ", ".join(str(w) for w in view.writable) or "none"
            out.append(
                f"{key}: {str(path)!r} is outside the unit's writable paths ({allowed}): "
                "with ProtectSystem=strict the service cannot write it; add "
                f"ReadWritePaths={path} in a drop-in, or keep the default"
            )
    return out


def _state_paths(settings: Any) -> list[tuple[str, Path]]:
    paths = [("agent.state_dir", settings.agent.state_dir)]
    if settings.outbox.path is not None:
        paths.append(("outbox.path", settings.outbox.path.parent))
    return paths
