"""Command line: ``edge-agent run | check-config | tap | outbox | status | sync | receiver | demo``.

Each sub-command parses its arguments, loads what it needs, configures logging and runs.
Errors a user can fix are printed as one clear line each and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent import config as cfg
from agent.configtypes import secret_value
from agent.errors import ConfigError

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _print_problems(exc: ConfigError) -> None:
    where = f"{exc.source}: " if exc.source else ""
    print(f"{where}invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for key, message in exc.problems:
        print(f"  {key}: {message}" if key else f"  {message}", file=sys.stderr)


def _load(
    path: str | None, checks: Sequence[cfg.Check] = ()
) -> tuple[cfg.Settings, list[str], Path]:
    file = cfg.config_path(path)
    settings, warnings = cfg.load(file, checks)
    return settings, warnings, file


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file: exit 0 when valid, 2 with every problem when not.

    Beyond the file itself (:func:`agent.config.load`), the machine it will run on: the
    state directory, every file it names, and what the service user could not read
    (:mod:`agent.preflight`).
    """
    from agent import preflight  # noqa: PLC0415

    try:
        settings, warnings, file = _load(args.file or args.config, [preflight.start_problems])
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    view = preflight.ServiceView.from_system()
    if view is None:
        warnings.append(
            f"no {preflight.UNIT} installed here: not checked whether the service user "
            "can read the files this config names"
        )
    else:
        warnings += preflight.service_warnings(settings, file, view)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    enabled = [n for n, s in settings.sources.items() if s.enabled]
    print(
        f"{file}: OK ({len(settings.sources)} sources, {len(enabled)} enabled; "
        f"outbox {settings.outbox_path()}; upstream {settings.upstream.target()})"
    )
    if args.explain:
        _explain(settings)
    if args.connect:
        return _connect(settings, file)
    return 0


def _connect(settings: cfg.Settings, file: Path) -> int:
    """``--connect``: each enabled source that can probe its peer does (SQL: every
    entity's query with LIMIT 0, and its mapped columns); exit 2 on any problem."""
    from agent import sources as source_plugins  # noqa: PLC0415
    from agent.sources.base import SourceConfig  # noqa: PLC0415

    async def run() -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        configured: dict[str, SourceConfig] = settings.sources
        for name, conf in configured.items():
            probe = source_plugins.source_plugin(conf.type).probe
            if probe is not None and conf.enabled:
                problems += await probe(name, conf)
                print(f"[sources.{name}] ({conf.type}): probed", file=sys.stderr)
        return problems

    problems = asyncio.run(run())
    if problems:
        _print_problems(ConfigError(problems, str(file)))
        return EXIT_USAGE
    print(f"{file}: --connect OK (every enabled SQL source answered, every mapped column exists)")
    return 0


def _explain(settings: cfg.Settings) -> None:
    """Print what each source that can explain itself will do (e.g. Modbus read plans)."""
    from agent import sources as source_plugins  # noqa: PLC0415
    from agent.sources.base import SourceConfig  # noqa: PLC0415

    configured: dict[str, SourceConfig] = settings.sources
    for name, conf in configured.items():
        explain = source_plugins.source_plugin(conf.type).explain
        if explain is not None:
            print(f"\n[sources.{name}] ({conf.type})")
            print(explain(conf))


def cmd_tap(args: argparse.Namespace) -> int:
    """Show what a source would produce right now, writing nothing (see agent/tap.py)."""
    from agent import logs, tap  # noqa: PLC0415
    from agent.sources.base import TapRequest  # noqa: PLC0415

    try:
        settings, warnings, _ = _load(args.config)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # Bad inputs are shown as items; the sources' log lines about them would repeat them.
    logs.configure("error", settings.logging.format)
    request = TapRequest(entity=args.entity, limit=args.limit, timeout=args.timeout)
    return tap.run(settings, args.source, request, args.json)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _tap_parser(sub: Any, config_opt: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tap",
        parents=[config_opt],
        help="show the records a source would produce now (writes nothing; safe while the "
        "agent runs)",
    )
    p.add_argument("source", help="source name, as in [sources.<name>]")
    p.add_argument("--entity", help="SQL: only this entity; Modbus: only this device")
    p.add_argument(
        "--limit",
        type=_positive,
        default=10,
        help="MQTT: messages to take; SQL: rows per entity (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_duration,
        default=10.0,
        help="MQTT: longest wait for messages, e.g. 30s (default 10s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (envelopes)")
    p.set_defaults(func=cmd_tap)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (what systemd starts)."""
    from agent import app, logs, preflight  # noqa: PLC0415 - keep check-config light

    try:
        # A state_dir it cannot write, a missing file: one line each and exit 2 (which the
        # unit does not restart), not a traceback and a crash loop.
        settings, warnings, file = _load(args.config, [preflight.start_problems])
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    logs.configure(settings.logging.level, settings.logging.format)
    import structlog  # noqa: PLC0415

    for warning in warnings:
        structlog.get_logger("agent").warning("config_warning", detail=warning)
    return asyncio.run(app.main(settings, file))


def _outbox_target(args: argparse.Namespace) -> tuple[Path, int | None]:
    """The outbox file and the configured byte budget (None: the config was not read).

    The budget lives in the config, not in the file: ``--db`` alone still reads the
    config when it can, so ``stats`` never shows the default budget for a configured one.
    """
    if not args.db:
        settings, _, _ = _load(args.config)
        return settings.outbox_path(), settings.outbox.max_bytes
    try:
        settings, _, _ = _load(args.config)
    except ConfigError:
        return Path(args.db), None
    return Path(args.db), settings.outbox.max_bytes


def cmd_outbox(args: argparse.Namespace) -> int:
    """Inspect or repair the outbox file (safe while the agent runs)."""
    from agent.outbox import Outbox  # noqa: PLC0415

    try:
        path, budget = _outbox_target(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    if not path.exists():
        print(f"no outbox at {path}", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> Any:
        async with Outbox(path, integrity_check="off") as box:
            if args.action == "stats":
                stats = (await box.stats()).as_dict()
                stats["max_bytes"] = budget  # None: unknown, the config was not read
                return stats
            if args.action == "dead":
                return await box.dead_letters(args.limit)
            if args.action == "quarantine":
                return await box.quarantined(args.limit)
            seqs = None if args.all else args.seq
            return {"requeued": await box.requeue_dead(seqs)}

    if args.action == "requeue" and not args.all and not args.seq:
        print("requeue: name dead-letter seqs, or --all", file=sys.stderr)
        return EXIT_USAGE
    result = asyncio.run(go())
    if args.action == "stats" and not args.json:
        _print_stats(path, result)
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _print_stats(path: Path, s: dict[str, Any]) -> None:
    age = s["oldest_age_seconds"]
    print(f"outbox          {path}")
    for cls in ("business", "reading"):
        print(f"{cls + ' rows':<16}{s['rows'][cls]:>12,}   {s['bytes'][cls]:>14,} bytes")
    budget = "? (config not read)" if s["max_bytes"] is None else f"{s['max_bytes']:,}"
    print(f"{'budget':<16}{s['total_bytes']:>12,} of {budget} bytes")
    print(f"{'oldest':<16}{'-' if age is None else f'{age:,.0f} s':>12}")
    print(f"{'dead letters':<16}{s['dead_letters']:>12,}")
    print(f"{'quarantined':<16}{s['quarantined']:>12,}")
    for reason, n in sorted(s["dropped"].items()):
        print(f"{'dropped ' + reason:<16}{n:>12,}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole job on a simulated building (see agent/demo)."""
    from agent import demo  # noqa: PLC0415

    return demo.run(args)


def _duration(text: str) -> float:
    from agent.configtypes import parse_duration  # noqa: PLC0415

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seq(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dead-letter seq (a number, as `edge-agent outbox dead` lists)"
        )
    return int(text)


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0.1 and 3600")
    return value


def _api_url(args: argparse.Namespace) -> tuple[str, Any, Path]:
    from agent import ctl  # noqa: PLC0415

    file = cfg.config_path(args.config)
    if args.url and args.command == "status":
        # The token, when the config can be read (reads may need it); --url alone works
        # for a user who cannot read the config, as long as reads are open.
        try:
            api = ctl.api_section(file)
        except ctl.CtlError:
            api = None
        return args.url.rstrip("/"), api, file
    api = ctl.api_section(file)
    return (args.url or ctl.base_url(api.listen)).rstrip("/"), api, file


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running agent's status (exit codes: agent/ctl.py)."""
    from agent import ctl  # noqa: PLC0415

    try:
        url, api, _ = _api_url(args)
        token = secret_value(api.token) if api is not None else None
        if args.watch is not None:
            if args.json:
                raise ctl.CtlError("--watch shows the table; --json is for one look", 2)
            return ctl.watch(url, token, args.watch)
        status = ctl.fetch_status(url, token)
    except ctl.CtlError as exc:
        return ctl.fail(exc)
    print(json.dumps(status, indent=2) if args.json else ctl.render_status(status))
    ready = (status.get("readiness") or {}).get("ready")
    return ctl.EXIT_OK if ready else ctl.EXIT_REFUSED


def cmd_sync(args: argparse.Namespace) -> int:
    """Ask the running agent for a manual (or full) sync of one source."""
    from agent import ctl  # noqa: PLC0415

    try:
        url, api, file = _api_url(args)
        answer = ctl.request_sync(url, ctl.token_of(api, file), args.source, args.entity, args.full)
    except ctl.CtlError as exc:
        return ctl.fail(exc)
    what = ", ".join(answer["accepted"]) if isinstance(answer["accepted"], list) else "all"
    kind = "full sync" if answer.get("full") else "sync"
    print(f"{kind} of {answer['source']} requested (entities: {what}); see edge-agent status")
    return ctl.EXIT_OK


def _add_ctl_commands(sub: Any, config_opt: argparse.ArgumentParser) -> None:
    url_help = "local API base URL (default: from the config's api.listen)"
    p = sub.add_parser("status", parents=[config_opt], help="show the running agent's status")
    p.add_argument("--json", action="store_true", help="the raw status (with readiness) as JSON")
    p.add_argument("--url", help=url_help)
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_watch_interval,
        metavar="SECONDS",
        help="refresh in place, like top (every 2 s, or SECONDS); Ctrl-C ends it",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "sync", parents=[config_opt], help="ask the running agent for a manual or full sync"
    )
    p.add_argument("source", help="source name, as in [sources.<name>]")
    p.add_argument("--entity", action="append", help="entity to sync (repeatable; default: all)")
    p.add_argument("--full", action="store_true", help="ignore the watermark: re-read everything")
    p.add_argument("--url", help=url_help)
    p.set_defaults(func=cmd_sync)


def cmd_receiver(args: argparse.Namespace) -> int:
    """Run the reference receiver (the upstream contract, for tests and demos)."""
    from agent import logs, receiver  # noqa: PLC0415 - only this command needs starlette

    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"receiver: invalid --listen {args.listen!r} (write host:port)", file=sys.stderr)
        return EXIT_USAGE
    token = args.token or os.environ.get("EDGE_AGENT_RECEIVER_TOKEN")
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    if not token:
        print("receiver: give --token, --token-file or $EDGE_AGENT_RECEIVER_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    faults = receiver.Faults(
        fail_rate=args.fail_rate,
        fail_status=args.fail_status,
        status=args.status,
        status_count=args.status_count if args.status is not None else 0,
        retry_after=args.retry_after,
        latency=args.latency,
        reject_pattern=args.reject_pattern,
        reject_mode=args.reject_mode,
        max_body_bytes=args.max_body_bytes,
    )
    try:
        faults.update({})  # validates, e.g. the regex
    except (ValueError, re.error) as exc:
        print(f"receiver: invalid fault setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure("info", "auto")
    store = receiver.Store(args.db)
    rx = receiver.Receiver(store, token, admin_token=args.admin_token, faults=faults)
    print(f"receiver listening on {args.listen} (db {args.db})", file=sys.stderr)
    try:
        asyncio.run(
            rx.serve_forever(
                host.strip("[]"),
                int(port),
                ssl_certfile=args.tls_cert,
                ssl_keyfile=args.tls_key,
                ssl_client_ca=args.tls_client_ca,
            )
        )
    finally:
        store.close()
    return 0


def _receiver_parser(sub: Any) -> None:
    p = sub.add_parser("receiver", help="run the reference upstream receiver (tests, demos)")
    p.add_argument("--listen", default="127.0.0.1:8480", help="host:port (default %(default)s)")
    p.add_argument("--db", default="receiver.db", help="SQLite file (default %(default)s)")
    p.add_argument("--token", help="bearer token agents must send")
    p.add_argument("--token-file", help="file holding the token")
    p.add_argument("--admin-token", help="token for /v1/_faults (default: --token)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="key of --tls-cert when not in the same file")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    f = p.add_argument_group("fault injection (also settable via POST /v1/_faults)")
    f.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests failed")
    f.add_argument("--fail-status", type=int, default=503, help="status of random failures")
    f.add_argument("--status", type=int, help="answer the next --status-count requests so")
    f.add_argument("--status-count", type=int, default=1, help="how many (default 1)")
    f.add_argument("--retry-after", help="Retry-After on injected failures")
    f.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    f.add_argument("--reject-pattern", help="regex on id/remote_id of records to refuse")
    f.add_argument("--reject-mode", choices=["record", "batch"], default="record")
    f.add_argument("--max-body-bytes", type=int, help="answer 413 above this body size")
    p.set_defaults(func=cmd_receiver)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent", description="On-premises edge gateway agent."
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "--config", help="config file (default: $EDGE_AGENT_CONFIG or /etc/edge-agent/config.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # `edge-agent run --config FILE` works as `edge-agent --config FILE run` does:
    # SUPPRESS keeps a sub-command's absent --config from hiding the global one.
    config_opt = argparse.ArgumentParser(add_help=False)
    config_opt.add_argument(
        "--config", default=argparse.SUPPRESS, help="config file (as the global --config)"
    )

    p = sub.add_parser("run", parents=[config_opt], help="run the agent in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[config_opt], help="validate a config file")
    p.add_argument("file", nargs="?", help="config file to check")
    p.add_argument("--explain", action="store_true", help="also print what each source will do")
    p.add_argument(
        "--connect",
        action="store_true",
        help="also query each SQL source (read-only, LIMIT 0): its queries and mapped columns",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="run the agent on a simulated building (nothing to set up)")
    p.add_argument("--duration", type=_duration, default=45.0, help="how long (default 45s)")
    p.add_argument(
        "--outage", type=_duration, default=0.0, help="cut the upstream this long mid-run, e.g. 15s"
    )
    p.add_argument("--json", action="store_true", help="print a final JSON summary on stdout")
    p.add_argument(
        "--show-config",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the generated agent config (default: yes)",
    )
    p.add_argument("--keep", action="store_true", help="keep the demo directory afterwards")
    p.add_argument("--seed", type=int, default=1000, help="simulation seed")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "outbox", parents=[config_opt], help="inspect the outbox: stats, dead letters, requeue"
    )
    p.add_argument("action", choices=["stats", "dead", "requeue", "quarantine"])
    p.add_argument("seq", nargs="*", type=_seq, help="dead-letter seqs to requeue")
    p.add_argument("--all", action="store_true", help="requeue every dead letter")
    p.add_argument("--db", help="outbox file (default: from the config)")
    p.add_argument("--limit", type=int, default=100, help="most rows to list")
    p.add_argument("--json", action="store_true", help="stats as JSON")
    p.set_defaults(func=cmd_outbox)
    _add_ctl_commands(sub, config_opt)
    _tap_parser(sub, config_opt)
    _receiver_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
