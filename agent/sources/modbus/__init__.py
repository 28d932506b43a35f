"""Modbus source: TCP, RTU over serial and RTU over TCP polling with read planning.

The plugin record (see :mod:`agent.sources`): rules, ``explain`` for
``edge-agent check-config --explain`` (the planned read requests), and ``tap``
(:mod:`.tap`: one poll of every device, written nowhere).
"""

from __future__ import annotations

from agent.sources.base import SourcePlugin
from agent.sources.modbus.config import ModbusConfig, profile_point
from agent.sources.modbus.planner import explain_device, plan
from agent.sources.modbus.source import ModbusSource
from agent.sources.modbus.tap import tap


def explain(config: ModbusConfig) -> str:
    """The planned read requests of every device, as text."""
    blocks = [explain_device(name, dev, plan(dev)) for name, dev in config.devices.items()]
    return "\n".join(blocks) if blocks else "no devices"


plugin = SourcePlugin(
    "modbus",
    ModbusConfig,
    ModbusSource,
    explain=explain,
    tap=tap,
    rules=True,
    profile_point=profile_point,
)

__all__ = ["ModbusConfig", "ModbusSource", "explain", "plugin"]
