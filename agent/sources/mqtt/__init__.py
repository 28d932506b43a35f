"""MQTT source plugin: QoS 1 persistent subscriptions, ack after commit, payload mapping.

See docs/mqtt.md. The modules: :mod:`.config` (the TOML tables), :mod:`.mapping` (message
to records, report-by-exception), :mod:`.sparkplug` (Sparkplug B decoding) and
:mod:`.source` (connection, reconnect, acknowledgement).
"""

from agent.sources.mqtt.config import MqttConfig
from agent.sources.mqtt.source import MqttSource

config_class = MqttConfig
source_class = MqttSource

__all__ = ["MqttConfig", "MqttSource", "config_class", "source_class"]
