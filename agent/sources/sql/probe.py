"""``edge-agent check-config --connect`` for SQL sources: the live database answers every
entity's query, and the result has every column the config maps.

Each query runs with ``LIMIT 0`` on the source's read-only session: no row is read, no
watermark moves, nothing is written. The column check is the one a sync makes on its
first chunk (:func:`agent.sources.sql.mapping.check_columns`).
"""

from __future__ import annotations

from agent.errors import AgentError
from agent.sources.sql import mapping, profiles
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.model import chunk_query


async def probe(name: str, config: SqlSourceConfig) -> list[tuple[str, str]]:
    """Problems as ``(key path, message)``; empty when every entity's query works."""
    at = f"sources.{name}"
    db = Database(config)
    problems: list[tuple[str, str]] = []
    try:
        db.open()
        for spec in profiles.build(config, db):
            wanted = mapping.mapped_columns(
                spec.name, spec.extra.get("columns", {}), config.mappings.get(spec.name)
            )
            for feed in spec.feeds:
                try:
                    columns = await db.columns(chunk_query(feed, None, 0))
                except AgentError as exc:
                    problems.append((f"{at}.{_entity_key(config, spec.name)}", str(exc)))
                    continue
                missing = mapping.missing_columns(wanted, columns)
                problems += [(f"{at}.{key}", msg) for key, msg in missing]
    except AgentError as exc:  # the driver, the connection, the credentials
        problems.append((f"{at}.url", f"cannot query the database: {exc}"))
    finally:
        await db.close()
    return list(dict.fromkeys(problems))  # several feeds of one entity: say it once


def _entity_key(config: SqlSourceConfig, entity: str) -> str:
    return f"entities.{entity}" if config.profile == "declarative" else "url"
