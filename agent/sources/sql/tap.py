"""``edge-agent tap`` for SQL sources: the first rows of each entity, mapped.

Each entity's first ``limit`` rows, as a first sync reads them (from the start of the
initial window, in watermark order), go through the entity's own mapping. The queries
run on the source's read-only session; the outbox is never opened, so no watermark is
read or moved and a running service is not disturbed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.errors import ConfigError, ReauthorizationRequired, TransientError
from agent.sources.base import SourceContext, Tapped, TapRequest
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.mapping import MissingColumnsError
from agent.sources.sql.source import SqlSource


async def tap(
    name: str, config: SqlSourceConfig, context: SourceContext, request: TapRequest
) -> AsyncIterator[Tapped]:
    """Records and bad rows of ``request.entity`` (default: every entity), at most
    ``request.limit`` rows each."""
    source = SqlSource(name, config, context)
    entities = list(source.entities)
    if request.entity is not None:
        if request.entity not in source.entities:
            raise ConfigError(
                [("--entity", f"source {name!r} has no entity {request.entity!r} "
                  f"(it has: {', '.join(entities)})")]
            )  # fmt: skip
        entities = [request.entity]
    try:
        source.db.open()
    except ConfigError as exc:
        raise ConfigError([(f"sources.{name}.{k}", m) for k, m in exc.problems]) from None
    try:
        for entity in entities:
            try:
                records, bad = await source.entities[entity].preview(request.limit)
            except MissingColumnsError as exc:
                raise ConfigError([(f"sources.{name}", str(exc))]) from None
            except (TransientError, ReauthorizationRequired) as exc:
                where = f"entity {entity!r} on {source.db.display_url}"
                raise TransientError(f"cannot query {where}: {exc}") from exc
            for record in records:
                yield record
            for row in bad:
                yield row
    finally:
        await source.db.close()
