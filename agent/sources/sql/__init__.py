"""SQL sources: SAP ECC, IBM Maximo and any CMMS database, read incrementally.

See docs/sql-sources.md. ``config_class`` and ``source_class`` are what the registry in
:mod:`agent.sources` looks up; ``probe`` is what ``check-config --connect`` runs.
"""

from __future__ import annotations

from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.probe import probe
from agent.sources.sql.source import SqlSource

config_class = SqlSourceConfig
source_class = SqlSource

__all__ = ["SqlSource", "SqlSourceConfig", "config_class", "probe", "source_class"]
