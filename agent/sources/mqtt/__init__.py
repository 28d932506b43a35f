"""MQTT source plugin: QoS 1 persistent subscriptions, ack after commit, payload mapping.

See docs/mqtt.md. The modules: :mod:`.config` (the TOML tables), :mod:`.mapping` (message
to records, report-by-exception), :mod:`.sparkplug` (Sparkplug B decoding),
:mod:`.client` (the one place that touches paho/aiomqtt internals) and :mod:`.source`
(connection, reconnect, acknowledgement). The plugin record declares rules and
``tap`` (:mod:`.tap`: the next messages under a client id of its own).
"""

from agent.sources.base import SourcePlugin
from agent.sources.mqtt.config import MqttConfig, profile_point
from agent.sources.mqtt.source import MqttSource
from agent.sources.mqtt.tap import tap

plugin = SourcePlugin(
    "mqtt", MqttConfig, MqttSource, tap=tap, rules=True, profile_point=profile_point
)

__all__ = ["MqttConfig", "MqttSource", "plugin"]
