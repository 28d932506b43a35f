"""SQL sources: SAP ECC, IBM Maximo and any CMMS database, read incrementally.

See docs/sql-sources.md. The plugin record declares ``probe`` (what ``check-config
--connect`` runs), ``sync`` (manual and full syncs, ``/v1/sync-status``) and ``tap``
(:mod:`.tap`: each entity's first rows, mapped, read-only); no rules (SQL records carry no
points).
"""

from __future__ import annotations

from typing import Any

from agent.sources.base import SourcePlugin, SyncAbility
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.probe import probe
from agent.sources.sql.source import SqlSource
from agent.sources.sql.tap import tap


def _request_sync(source: SqlSource, entities: list[str] | None, full: bool) -> list[str]:
    return source.request_sync(entities, full)


def _sync_status(source: SqlSource) -> dict[str, Any]:
    return source.sync_status()


plugin = SourcePlugin(
    "sql",
    SqlSourceConfig,
    SqlSource,
    probe=probe,
    tap=tap,
    sync=SyncAbility(request=_request_sync, status=_sync_status),
)

__all__ = ["SqlSource", "SqlSourceConfig", "plugin", "probe"]
