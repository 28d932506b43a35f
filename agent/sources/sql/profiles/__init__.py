"""Profiles turn a source config into entity specs (see :mod:`agent.sources.sql.model`).

* ``sap_ecc``: SAP ECC tables (EQUI, IFLOT, AUFK, QMEL, JEST/JCDS, MARA, EKKO ...).
* ``maximo``: IBM Maximo WORKORDER, ASSET, LOCATIONS by ROWSTAMP or CHANGEDATE.
* ``declarative``: any schema, declared table by table in the config.
"""

from __future__ import annotations

from agent.errors import ConfigError
from agent.sources.sql.config import SqlSourceConfig
from agent.sources.sql.engine import Database
from agent.sources.sql.model import EntitySpec

_SYSTEMS = {"sap_ecc": "sap_ecc", "maximo": "maximo", "declarative": "sql"}


def system_of(config: SqlSourceConfig) -> str:
    """The ``source.system`` stamped on records of this profile."""
    return _SYSTEMS[config.profile]


def build(config: SqlSourceConfig, db: Database) -> list[EntitySpec]:
    """The entity specs of the configured profile (restricted by ``include``)."""
    if config.profile == "sap_ecc":
        from agent.sources.sql.profiles import sap_ecc as module  # noqa: PLC0415
    elif config.profile == "maximo":
        from agent.sources.sql.profiles import maximo as module  # type: ignore[no-redef]  # noqa: PLC0415
    else:
        from agent.sources.sql.profiles import declarative as module  # type: ignore[no-redef]  # noqa: PLC0415
    specs = module.specs(config, db)
    if config.include is not None:
        known = {s.name for s in specs}
        unknown = sorted(set(config.include) - known)
        if unknown:
            raise ConfigError(
                [("include", f"unknown entities {unknown}; {config.profile} has {sorted(known)}")]
            )
        specs = [s for s in specs if s.name in config.include]
    return specs
