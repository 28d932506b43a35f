"""Modbus source: TCP, RTU over serial and RTU over TCP polling with read planning.

Plugin contract (see :mod:`agent.sources`): ``config_class``, ``source_class``, and
``explain(config)`` for ``edge-agent check-config --explain``.
"""

from __future__ import annotations

from agent.sources.base import SourceConfig
from agent.sources.modbus.config import ModbusConfig
from agent.sources.modbus.planner import explain_device, plan
from agent.sources.modbus.source import ModbusSource

config_class = ModbusConfig
source_class = ModbusSource


def explain(config: SourceConfig) -> str:
    """The planned read requests of every device, as text."""
    assert isinstance(config, ModbusConfig)
    blocks = [explain_device(name, dev, plan(dev)) for name, dev in config.devices.items()]
    return "\n".join(blocks) if blocks else "no devices"


__all__ = ["ModbusConfig", "ModbusSource", "config_class", "explain", "source_class"]
