"""packaging/build-deb: build the .deb, check its contents, install it into a throwaway root.

The install uses ``dpkg --root=DIR --force-script-chrootless``: the maintainer scripts run
with ``DPKG_ROOT=DIR`` and create the service user in DIR/etc/passwd, never in this
machine's. The installed venv is then run from /opt/edge-agent inside a private mount
namespace (a tmpfs over /opt, the installed tree bound on it), as the unit will run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from agent.outbox import Outbox
from agent.receiver import Receiver, running_receiver
from tests.agent_process import toml_dumps
from tests.helpers.waiting import free_port
from tests.sql.conftest import Backend, _mariadb, _postgres
from tests.upstream_support import make_records

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("dpkg-deb") or not shutil.which("dpkg"):
        pytest.skip("dpkg-deb/dpkg not available: the .deb is built on Debian-family hosts")
    if prebuilt := os.environ.get("EDGE_AGENT_TEST_DEB"):  # iterate on the tests only
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [str(ROOT / "packaging" / "build-deb"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.exists()
    return path


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def test_package_metadata_and_contents(deb: Path) -> None:
    info = run("dpkg-deb", "-I", str(deb))
    assert "Package: edge-agent" in info
    assert "Depends: python3 (>= 3.11), python3 (<< 3.12)" in info
    assert "libssl3 | libssl3t64" in info  # libcrypto, for the C record builder
    for script in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert f" {script} " in info, info
    assert (
        run("dpkg-deb", "-f", str(deb), "Architecture").strip()
        == run("dpkg", "--print-architecture").strip()
    )
    assert run("dpkg-deb", "-I", str(deb), "conffiles").split() == ["/etc/edge-agent/config.toml"]
    postinst = run("dpkg-deb", "-I", str(deb), "postinst")
    assert "DPKG_ROOT" in postinst
    enabling = [
        line
        for line in postinst.splitlines()
        if "systemctl enable" in line and not line.lstrip().startswith(("#", "echo"))
    ]
    assert enabling == [], "postinst must not enable the service on install"

    listing = run("dpkg-deb", "-c", str(deb))
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for expected in (
        "/opt/edge-agent/bin/edge-agent",
        "/opt/edge-agent/pyvenv.cfg",
        "/lib/systemd/system/edge-agent.service",
        "/etc/edge-agent/config.toml",
        "/usr/lib/sysusers.d/edge-agent.conf",
        "/usr/share/doc/edge-agent/copyright",
        "/usr/share/doc/edge-agent/examples/serial-port.conf",
        "/usr/share/edge-agent/grafana/edge-agent.dashboard.json",
        "/usr/share/edge-agent/grafana/edge-agent.rules.yml",
        "/var/lib/edge-agent/",
    ):
        assert expected in paths, expected
    assert any(p.startswith("/opt/edge-agent/lib/python3.11/site-packages/agent/") for p in paths)
    # build-deb refuses to package without the C record builder (unless told to).
    site = "/opt/edge-agent/lib/python3.11/site-packages/agent/"
    assert any(p.startswith(site + "_envelope.") and p.endswith(".so") for p in paths)
    # The status page's assets are package data (the page loads nothing from elsewhere).
    for asset in ("web/status.css", "web/status.js"):
        assert site + asset in paths, asset
    owners = {line.split()[1] for line in listing.splitlines()}
    assert owners == {"root/root"}, owners


def test_lintian_findings_are_reported(deb: Path) -> None:
    if not shutil.which("lintian"):
        pytest.skip("lintian not installed (apt-get install lintian); nothing to report")
    r = subprocess.run(
        ["lintian", "--no-tag-display-limit", str(deb)], capture_output=True, text=True
    )
    print(r.stdout)
    # No error and no warning: what a bundled virtualenv draws by design is overridden in
    # packaging/lintian-overrides, each with its reason (info and pedantic tags pass).
    found = [line for line in r.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert not found, "\n".join(found)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "var/lib/dpkg/available").touch()
    before = sha("/etc/passwd"), sha("/etc/group")
    dpkg_install(root, deb)
    assert (sha("/etc/passwd"), sha("/etc/group")) == before, "host users changed"
    return root


def dpkg_install(root: Path, deb: Path) -> str:
    return run(
        "dpkg",
        f"--root={root}",
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
        "-i",
        str(deb),
    )


def owner(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / name).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "edge-agent":
            return int(fields[2]), int(fields[3]) if name == "passwd" else -1
    raise AssertionError(f"no edge-agent in {name}")


def test_install_lands_where_the_unit_expects(installed: Path) -> None:
    root = installed
    uid, gid = owner(root, "passwd")
    state = (root / "var/lib/edge-agent").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (uid, gid, 0o750)
    conf = (root / "etc/edge-agent/config.toml").stat()
    assert (conf.st_uid, conf.st_gid, conf.st_mode & 0o777) == (0, gid, 0o640)  # by postinst
    assert "edge-agent:x:" in (root / "etc/passwd").read_text()
    assert "/usr/sbin/nologin" in (root / "etc/passwd").read_text()

    unit = (root / "lib/systemd/system/edge-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.split("=", 1)[1].split()[0]
    assert (root / binary.lstrip("/")).exists()
    script = (root / "opt/edge-agent/bin/edge-agent").read_text()
    assert script.startswith("#!/opt/edge-agent/bin/python\n"), script[:80]
    assert "--config /etc/edge-agent/config.toml" in exec_start
    # Not enabled on a first install (docs/operations.md says why).
    assert not (root / "etc/systemd/system/multi-user.target.wants").exists()


def in_opt(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with the installed tree at /opt/edge-agent (private mount ns)."""
    script = (
        "mount -t tmpfs tmpfs /opt && mkdir /opt/edge-agent && "
        f"mount --bind {root}/opt/edge-agent /opt/edge-agent && {command}"
    )
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_binary_runs_and_the_unit_verifies(installed: Path) -> None:
    root = installed
    probe = in_opt(root, "true")
    if probe.returncode != 0:
        # No mount namespace (unprivileged): run the entry point with the venv's python.
        r = subprocess.run(
            [
                f"{root}/opt/edge-agent/bin/python",
                f"{root}/opt/edge-agent/bin/edge-agent",
                "--version",
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r
        assert r.stdout.startswith("edge-agent "), r
        pytest.skip(
            f"cannot bind /opt/edge-agent here ({probe.stderr.strip()}); ran via venv python"
        )
    r = in_opt(root, "/opt/edge-agent/bin/edge-agent --version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("edge-agent 0."), r.stdout
    r = in_opt(
        root, f"/opt/edge-agent/bin/edge-agent check-config {root}/etc/edge-agent/config.toml"
    )
    assert r.returncode == 0, r.stderr
    if shutil.which("systemd-analyze"):
        r = in_opt(root, f"systemd-analyze verify {root}/lib/systemd/system/edge-agent.service")
        assert r.returncode == 0, r.stderr
        assert not r.stderr.strip(), r.stderr


def test_reinstall_keeps_the_edited_config_and_purge_keeps_the_outbox(
    installed: Path, deb: Path
) -> None:
    root = installed
    conf = root / "etc/edge-agent/config.toml"
    conf.write_text(conf.read_text().replace('id = "plant-1000-gw1"', 'id = "edited-by-admin"'))
    (root / "var/lib/edge-agent/outbox.db").write_bytes(b"undelivered")
    dpkg_install(root, deb)
    assert 'id = "edited-by-admin"' in conf.read_text()
    out = run(
        "dpkg",
        f"--root={root}",
        "--force-script-chrootless",
        "--log=/dev/null",
        "--purge",
        "edge-agent",
    )
    assert "kept /var/lib/edge-agent" in out
    assert (root / "var/lib/edge-agent/outbox.db").read_bytes() == b"undelivered"
    assert not conf.exists()
    assert not (root / "opt/edge-agent/bin/edge-agent").exists()


# --------------------------------------------------------- the packaged agent, running

TOKEN = "packaged-upstream-token"


def fresh_root(tmp: Path) -> Path:
    root = tmp / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "var/lib/dpkg/available").touch()
    return root


def packaged(root: Path, *args: str) -> list[str]:
    """The command line of the packaged ``edge-agent`` of ``root``.

    The venv's absolute paths name /opt/edge-agent (build-deb relocates the staging venv
    there, as dh-virtualenv does): its scripts' shebangs and ``pyvenv.cfg``. Where a
    private mount namespace can be had, the tree is bound at /opt/edge-agent and the
    packaged script runs exactly as the unit's ExecStart. Elsewhere the venv's own
    interpreter runs the script: Python finds its venv from ``pyvenv.cfg`` beside the
    interpreter's path, so it is still the package's site-packages that load.
    """
    if in_opt(root, "true").returncode == 0:
        script = (
            "mount -t tmpfs tmpfs /opt && mkdir /opt/edge-agent && "
            f'mount --bind {root}/opt/edge-agent /opt/edge-agent && exec "$@"'
        )
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            "/opt/edge-agent/bin/edge-agent",
            *args,
        ]
    venv = root / "opt/edge-agent/bin"
    return [str(venv / "python"), str(venv / "edge-agent"), *args]


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no test settings: only the package's own code can load."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "EDGE_AGENT_", "NOTIFY_", "WATCHDOG_"))
    }


def sql_source(backend: Backend, table: str) -> dict[str, Any]:
    source: dict[str, Any] = {
        "type": "sql",
        "profile": "declarative",
        "url": backend.url,
        "interval": "1s",
        "initial_window": "3650d",
        "entities": {
            "work_orders": {
                "entity_type": "work_order",
                "table": f"{backend.schema}.{table}" if backend.schema else table,
                "key": ["wonum"],
                "cursor": "changed_at",
                "fields": {"title": "descr"},
            }
        },
    }
    return source


async def wo_table(backend: Backend, rows: int) -> str:
    table = "pkg_wo"
    async with backend.engine.begin() as conn:
        if backend.schema:
            await conn.execute(text(f'SET search_path TO "{backend.schema}"'))
        await conn.execute(
            text(
                f"CREATE TABLE {table} (wonum VARCHAR(20) PRIMARY KEY, descr VARCHAR(80), "
                "changed_at TIMESTAMP(6) NULL)"
            )
        )
        for i in range(rows):
            await conn.execute(
                text(f"INSERT INTO {table} VALUES (:w, :d, CURRENT_TIMESTAMP)"),
                {"w": f"{backend.name}-{i}", "d": f"job {i} on {backend.name}"},
            )
    return table


def agent_config(path: Path, state: Path, upstream: str, sources: dict[str, Any]) -> Path:
    data = {
        "agent": {"id": "packaged-gw", "state_dir": str(state)},
        "logging": {"format": "json"},
        "upstream": {"url": upstream, "token": TOKEN, "drain_timeout": "5s"},
        "api": {"listen": f"127.0.0.1:{free_port()}"},
        "sources": sources,
    }
    path.write_text(toml_dumps(data) + "\n")
    return path


async def delivered(rx: Receiver) -> dict[str, set[str]]:
    """remote ids the receiver holds, per source."""
    out: dict[str, set[str]] = {}
    cursor = 0
    while True:
        bodies, nxt = await asyncio.to_thread(rx.store.page, None, None, cursor, 500)
        for body in bodies:
            rec = orjson.loads(body)
            out.setdefault(rec["source"]["name"], set()).add(rec["remote_id"])
        if nxt is None:
            return out
        cursor = int(nxt)


@contextlib.asynccontextmanager
async def agent_running(
    root: Path, conf: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *packaged(root, "--config", str(conf), "run"),
            env=clean_env(),
            cwd=conf.parent,
            stdout=err,
            stderr=err,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(60):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def wait_until(check: Any, proc: asyncio.subprocess.Process, log: Path) -> None:
    async with asyncio.timeout(180):  # a bound, not a timing: a loaded CI machine is slow
        while not await check():
            assert proc.returncode is None, log.read_text()[-3000:]
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files, as ``dpkg-deb -x`` lays them out (no maintainer scripts)."""
    root = tmp_path_factory.mktemp("extracted")
    run("dpkg-deb", "-x", str(deb), str(root))
    return root


def test_the_package_carries_the_documented_drivers(extracted: Path) -> None:
    probe = subprocess.run(
        packaged(extracted, "--version"), capture_output=True, text=True, env=clean_env()
    )
    assert probe.returncode == 0, probe.stderr
    python = extracted / "opt/edge-agent/bin/python"
    code = (
        "import agent, asyncpg, asyncmy, oracledb, sys; "
        "print(agent.__file__); print(oracledb.is_thin_mode())"
    )
    r = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=clean_env(), cwd="/"
    )
    assert r.returncode == 0, r.stderr
    where, thin = r.stdout.split()
    assert where.startswith(str(extracted / "opt/edge-agent/lib/")), where
    assert thin == "True"  # Oracle without Instant Client
    for extra in ("aioodbc", "hdbcli"):  # documented extras, not carried
        r = subprocess.run(
            [str(python), "-c", f"import {extra}"], capture_output=True, env=clean_env(), cwd="/"
        )
        assert r.returncode != 0, extra


async def test_packaged_agent_delivers_postgresql_and_mariadb_to_the_receiver(
    extracted: Path, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pg = await stack.enter_async_context(contextlib.asynccontextmanager(_postgres)())
        maria = await stack.enter_async_context(contextlib.asynccontextmanager(_mariadb)())
        sources = {
            "pg-cmms": sql_source(pg, await wo_table(pg, 4)),
            "maria-cmms": sql_source(maria, await wo_table(maria, 3)),
        }
        rx = await stack.enter_async_context(running_receiver(tmp_path / "rx.db", TOKEN))
        conf = agent_config(tmp_path / "config.toml", tmp_path / "state", rx.url, sources)
        for check in (["check-config", str(conf)], ["check-config", "--connect", str(conf)]):
            r = await asyncio.to_thread(
                subprocess.run,
                packaged(extracted, *check),
                capture_output=True,
                text=True,
                env=clean_env(),
                cwd="/",
            )
            assert r.returncode == 0, r.stderr + r.stdout
        # The README's walk: tap before the start shows the mapped rows, writes nothing.
        for name, prefix in (("pg-cmms", "postgresql"), ("maria-cmms", "mariadb")):
            r = await asyncio.to_thread(
                subprocess.run,
                packaged(extracted, "--config", str(conf), "tap", name, "--json", "--limit", "2"),
                capture_output=True,
                text=True,
                env=clean_env(),
                cwd="/",
            )
            assert r.returncode == 0, r.stderr + r.stdout
            tapped = [orjson.loads(line) for line in r.stdout.splitlines()]
            assert [t["remote_id"] for t in tapped] == [f"{prefix}-0", f"{prefix}-1"], r.stdout
            assert tapped[0]["data"] == {"title": f"job 0 on {prefix}"}
        assert not (tmp_path / "state").exists()  # no outbox, no state dir made by tap
        log = tmp_path / "agent.log"
        async with agent_running(extracted, conf, log) as proc:
            want = {
                "pg-cmms": {f"postgresql-{i}" for i in range(4)},
                "maria-cmms": {f"mariadb-{i}" for i in range(3)},
            }

            async def arrived() -> bool:
                return await delivered(rx) == want

            await wait_until(arrived, proc, log)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                assert await proc.wait() == 0, log.read_text()[-3000:]
        assert b'"agent_started"' in log.read_bytes()


def queued_ids(state: Path) -> set[str]:
    con = sqlite3.connect(state / "outbox.db")
    try:
        return {row[0] for row in con.execute("SELECT id FROM records")}
    finally:
        con.close()


def bumped(deb: Path, out: Path, version: str) -> Path:
    """The same package as version ``version``: what `apt install ./<new>.deb` upgrades to
    (same files, a higher version: dpkg runs the full upgrade path of the scripts)."""
    tree = out / "tree"
    run("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN/control"
    lines = [
        f"Version: {version}" if line.startswith("Version:") else line
        for line in control.read_text().splitlines()
    ]
    control.write_text("\n".join(lines) + "\n")
    new = out / f"edge-agent_{version}.deb"
    # Fast compression: the bytes inside are what matter to the upgrade, not how packed.
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree), str(new))
    return new


async def test_upgrade_keeps_the_config_and_the_queued_outbox(deb: Path, tmp_path: Path) -> None:
    root = fresh_root(tmp_path)
    await asyncio.to_thread(dpkg_install, root, deb)
    old = run("dpkg-deb", "-f", str(deb), "Version").strip()
    # The admin's config, and records queued while the upstream was away.
    state = root / "var/lib/edge-agent"
    conf = root / "etc/edge-agent/config.toml"
    async with running_receiver(tmp_path / "rx.db", TOKEN) as rx:
        agent_config(conf, state, rx.url, {})
        edited = conf.read_text()
        queued = make_records(25, entities=5)
        async with Outbox(state / "outbox.db") as box:
            await box.append(queued)
        ids = queued_ids(state)  # as the outbox stamped them (chained version ids)
        assert len(ids) == 25
        newer = await asyncio.to_thread(bumped, deb, tmp_path, f"{old}+upgrade1")
        out = await asyncio.to_thread(dpkg_install, root, newer)
        status = (root / "var/lib/dpkg/status").read_text()
        assert f"Version: {old}+upgrade1" in status, out
        assert conf.read_text() == edited  # the conffile the admin changed is kept
        assert queued_ids(state) == ids
        # The upgraded agent sends what the old one had queued.
        log = tmp_path / "agent.log"
        async with agent_running(root, conf, log) as proc:

            async def arrived() -> bool:
                return await asyncio.to_thread(rx.store.count) == 25

            await wait_until(arrived, proc, log)
        got = {orjson.loads(b)["id"] for b in rx.store.page(None, None, 0, 100)[0]}
        assert got == ids
