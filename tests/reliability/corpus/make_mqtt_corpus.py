"""Writes the malformed MQTT payload corpus (tests/reliability/corpus/mqtt/).

Deterministic: run it again and the files are byte-identical. Each file is
``NNN-<expected>.bin``; ``<expected>`` is the reason the agent must give: a quarantine
reason of the MQTT mapper, or ``timestamp_fallback`` (the message still maps, with its
receive time, and the fallback is counted). The subscription these payloads are sent to
is ``rel/{asset}/v`` with ``timestamp_path = "ts"`` and one point ``v`` of ``type = "float"``.

    python tests/reliability/corpus/make_mqtt_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent / "mqtt"


def corpus() -> list[tuple[str, bytes]]:
    """(expected reason, payload) pairs."""
    rng = random.Random(20261122)
    noise = [bytes([0xFF]) + rng.randbytes(n) for n in (1, 16, 200)]
    cases: list[tuple[str, bytes]] = [
        # not UTF-8
        ("invalid_utf8", b"\xff\xfe"),
        ("invalid_utf8", b"\xc3\x28"),
        ("invalid_utf8", b'{"ts": 1800000000, "v": "\xed\xa0\x80"}'),  # a UTF-16 surrogate
        ("invalid_utf8", b'{"v": "caf\xe9"}'),  # Latin-1
        ("invalid_utf8", b"\x80"),
        *[("invalid_utf8", n) for n in noise],
        # not JSON
        ("invalid_json", b""),
        ("invalid_json", b"   "),
        ("invalid_json", b"{"),
        ("invalid_json", b"}"),
        ("invalid_json", b'{"v": }'),
        ("invalid_json", b"{'v': 1}"),
        ("invalid_json", b"NaN"),
        ("invalid_json", b'{"v": NaN}'),
        ("invalid_json", b'{"v": Infinity}'),
        ("invalid_json", b"[1, 2"),
        ("invalid_json", b'{"v": 1,}'),
        ("invalid_json", b"tru"),
        ("invalid_json", b'{"v": 01}'),
        ("invalid_json", b'"unterminated'),
        ("invalid_json", b'{"v": 1} trailing'),
        ("invalid_json", b"\x00\x00\x00"),
        ("invalid_json", b"[" * 5000),  # nesting deeper than any parser allows
        ("invalid_json", b'{/* comment */ "v": 1}'),
        ("invalid_json", b'\xef\xbb\xbf{"v": 1}'),  # UTF-8 byte order mark
        ("invalid_json", b'{"v": 1e99999}'),
        # JSON without the point
        ("missing_path", b"{}"),
        ("missing_path", b"[]"),
        ("missing_path", b"1"),
        ("missing_path", b'"text"'),
        ("missing_path", b"null"),
        ("missing_path", b"true"),
        ("missing_path", b'{"x": 1}'),
        ("missing_path", b'{"V": 1}'),
        ("missing_path", b'[{"v": 1}]'),
        ("missing_path", b'{"v/": 1}'),
        # the point, with a value that is not a number
        ("wrong_type", b'{"ts": 1800000000, "v": "abc"}'),
        ("wrong_type", b'{"ts": 1800000000, "v": null}'),
        ("wrong_type", b'{"ts": 1800000000, "v": {}}'),
        ("wrong_type", b'{"ts": 1800000000, "v": []}'),
        ("wrong_type", b'{"ts": 1800000000, "v": [1]}'),
        ("wrong_type", b'{"ts": 1800000000, "v": "1,5"}'),
        ("wrong_type", b'{"ts": 1800000000, "v": "inf"}'),
        ("wrong_type", b'{"ts": 1800000000, "v": "nan"}'),
        ("wrong_type", b'{"ts": 1800000000, "v": "1e400"}'),
        ("wrong_type", b'{"ts": 1800000000, "v": "   "}'),
        ("wrong_type", b'{"ts": 1800000000, "v": {"v": 1}}'),
        # too large
        ("payload_too_large", b'{"v": 1, "pad": "' + b"x" * (300 * 1024) + b'"}'),
        ("payload_too_large", b" " * (256 * 1024 + 1)),
        # a good value with an unreadable timestamp
        ("bad_timestamp", b'{"ts": "yesterday", "v": 1}'),
        ("bad_timestamp", b'{"ts": {}, "v": 3}'),
        ("bad_timestamp", b'{"ts": "2026-13-45T99:99:99Z", "v": 4}'),
        ("bad_timestamp", b'{"ts": -1e30, "v": 5}'),
        ("bad_timestamp", b'{"ts": 1e20, "v": 6}'),
        ("bad_timestamp", b'{"ts": true, "v": 7}'),
        # no timestamp at all: the receive time is used, and that is counted
        ("timestamp_fallback", b'{"ts": null, "v": 2}'),
        ("timestamp_fallback", b'{"v": 8}'),
    ]
    return cases


def main() -> None:
    """(Re)write the corpus files."""
    HERE.mkdir(exist_ok=True)
    for old in HERE.glob("*.bin"):
        old.unlink()
    for n, (reason, payload) in enumerate(corpus()):
        (HERE / f"{n:03d}-{reason}.bin").write_bytes(payload)


if __name__ == "__main__":
    main()
