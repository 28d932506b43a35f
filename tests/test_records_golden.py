"""Golden ids, hashes and envelopes: the bytes a record is stored and sent as never change.

The expected values below were computed with the code as it was BEFORE the serialization
fast paths (one orjson call per envelope, hashing the canonical data bytes once, mapping
shortcuts in the SQL and MQTT sources). Any change of an id, entity id, content hash or
envelope byte for the same input breaks the upstream's duplicate detection and must be
deliberate; this file is what proves the fast paths did not change them.

``GOLDEN`` pins the sha256 of every envelope (and its ids); ``FULL`` pins two envelopes
byte for byte, so a failure shows what moved. The SQL and MQTT cases run the real mapping
paths (declarative sync over a SQLite CMMS, the MQTT mapper) with fixed times.

Entity versions are stored under chained ids (schema 3), which depend on the outbox's
epoch: the SQL case pins it (``EPOCH``). ``SQL_GOLDEN`` is what the outbox stores;
``SQL_UNCHAINED`` is the same bodies with the provisional id put back, and kept the
value it had before chaining existed: proof that chaining moved the ids and nothing else.

To regenerate after a DELIBERATE format change (never for a speed-up):
``python -m tests.test_records_golden``. Deliberate changes so far: readings and events
(and ``connection_status.changed_at``) moved to observation identity, ids covering the
content and times in microseconds (CHANGELOG, "Changed"); entity versions did not move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import sys
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.outbox import Outbox
from agent.records import (
    NS,
    EntityType,
    Op,
    Record,
    SourceRef,
    canonical_json,
    chain_id,
    connection_status,
)
from agent.sources.base import SourceContext
from agent.sources.mqtt import MqttConfig
from agent.sources.mqtt.mapping import Mapper
from agent.sources.sql import SqlSource, SqlSourceConfig
from tests.helpers import strategies
from tests.helpers.builders import BUILDERS, using
from tests.outbox_helpers import pin_epoch

T0 = datetime(2026, 11, 22, 9, 0, 3, 120456, tzinfo=UTC)
SAP = SourceRef("sap-prd", "sap_ecc", "plant-1000")
NOSITE = SourceRef("cmms", "sql")
EPOCH = "0e5c6d1f-2a3b-4c4d-9e5f-60718293a4b5"


# ---------------------------------------------------------------------- the reference


def reference_json(rec: Record) -> bytes:
    """The envelope exactly as the original ``Record.to_json`` built it."""
    env: dict[str, Any] = {
        "id": rec.id,
        "entity_id": rec.entity_id,
        "entity_type": str(rec.entity_type),
        "op": str(rec.op),
        "source": {"name": rec.source.name, "system": rec.source.system, "site": rec.source.site},
        "remote_id": rec.remote_id,
        "source_modified_at": rec.source_modified_at,
        "modified_precision": rec.modified_precision,
        "observed_at": rec.observed_at,
        "content_hash": rec.content_hash,
        "data": rec.data,
        "custom": rec.custom,
    }
    if rec.remote_data is not None:
        env["remote_data"] = rec.remote_data
    return canonical_json(env)


def reference_hash(
    op: str, data: dict[str, Any], custom: dict[str, Any], remote: dict[str, Any] | None
) -> str:
    """The original ``content_hash``."""
    body = {"op": op, "data": data, "custom": custom, "remote_data": remote}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


# ---------------------------------------------------------------------- record cases


def record_cases() -> dict[str, Record]:
    """Records covering every value type the envelope carries."""
    wo = {
        "title": "Replace door motor ü€",
        "status": "released",
        "asset_remote_id": "000000010001",
        "priority": 2,
        "qty": Decimal("12.500"),
        "cost": 1234.5,
        "due": date(2026, 12, 1),
        "started": datetime(2026, 11, 21, 8, 15, tzinfo=timezone(timedelta(hours=1))),
        "naive": datetime(2026, 11, 21, 8, 15, 0, 999999),
        "blob": b"\x00\xffab",
        "tags": frozenset({"b", "a"}),
        "nested": {"z": [1, None, True], "a": {"y": "x"}},
        "empty": "",
        "none": None,
    }
    return {
        "entity_full": Record.entity(
            SAP,
            EntityType.WORK_ORDER,
            "000004001234",
            wo,
            custom={"zz_contract": "C-77"},
            remote_data={"AUFNR": "000004001234", "KTEXT": "Replace door motor", "N": None},
            source_modified_at=datetime(2026, 11, 21, 0, 0, tzinfo=UTC),
            modified_precision="day",
            observed_at=T0,
        ),
        "entity_plain": Record.entity(
            NOSITE, EntityType.ASSET, "PUMP-1", {"name": "pump"}, observed_at=T0
        ),
        "entity_delete_date_str": Record.entity(
            NOSITE,
            EntityType.LOCATION,
            "L/1",
            {"deleted": True, "reason": "not_found_in_source"},
            op=Op.DELETE,
            source_modified_at="2026-11-20T08:00:00.000Z",
            observed_at=datetime(2026, 11, 22, 10, 0),
        ),
        "entity_date_modified": Record.entity(
            SAP,
            EntityType.PART,
            "MAT-1",
            {"unit": "EA"},
            source_modified_at=date(2026, 11, 20),
            modified_precision="none",
            observed_at=T0,
        ),
        "reading": Record.reading(
            SAP,
            EntityType.METER_READING,
            "lift-7/motor_temp",
            T0,
            {"value": 71.25, "unit": "degC", "quality": "good", "asset_remote_id": "L7"},
        ),
        "reading_custom_remote": Record.reading(
            NOSITE,
            EntityType.EVENT,
            "lift-7/fault",
            datetime(2026, 11, 22, 9, 0, 3, tzinfo=timezone(timedelta(hours=-5))),
            {"code": "E12", "severity": "major"},
            custom={"k": 1},
            remote_data={"raw": [1, 2]},
        ),
        "connection_status": connection_status(
            SAP, "failed", reason="credentials_rejected", detail="401", at=T0
        ),
    }


def fingerprint(rec: Record) -> list[str]:
    """What must never change: ids, hash, and the envelope bytes (as sha256)."""
    return [
        rec.id,
        rec.entity_id,
        rec.content_hash,
        hashlib.sha256(rec.to_json()).hexdigest(),
    ]


# ---------------------------------------------------------------------- sql case


def _cmms(path: Path) -> str:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE wo (wonum TEXT PRIMARY KEY, descr TEXT, status TEXT, equip TEXT, "
        "zz_contract TEXT, deleted INTEGER DEFAULT 0, qty REAL, changed_at TIMESTAMP)"
    )
    at = datetime(2026, 11, 20, 8, 0, 0)
    rows = [
        (f"WO-{i:04d}", f"job {i} ü  ", "OPEN" if i % 3 else "CLOSED", f"PUMP-{i % 2}",
         "C-77", int(i == 4), i * 1.5, (at + timedelta(seconds=i // 2)).isoformat(sep=" "))
        for i in range(7)
    ]  # fmt: skip
    con.executemany("INSERT INTO wo VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"


def _sql_config(url: str, mapped: bool) -> SqlSourceConfig:
    data: dict[str, Any] = {
        "type": "sql",
        "profile": "declarative",
        "url": url,
        "initial_window": None,
        "chunk_size": 3,
        "entities": {
            "work_orders": {
                "entity_type": "work_order",
                "table": "wo",
                "key": ["wonum"],
                "cursor": "changed_at",
                "fields": {"title": "descr", "status": "status", "asset_remote_id": "equip"},
                "deleted_when": {"deleted": "1"},
            }
        },
    }
    if mapped:
        data["mappings"] = {
            "work_orders": {
                "rename": {"title": "name"},
                "drop": ["status"],
                "custom": {"contract": "ZZ_CONTRACT"},
            }
        }
    return SqlSourceConfig.model_validate(data)


async def sql_bodies(tmp: Path, mapped: bool) -> list[bytes]:
    """Outbox bodies of a declarative initial sync, ``observed_at`` blanked (it is now())."""
    tmp.mkdir(parents=True, exist_ok=True)
    url = _cmms(tmp / "cmms.db")
    source = SqlSource("cmms", _sql_config(url, mapped), SourceContext("a", "plant-1"))
    pin_epoch(tmp / "outbox.db", EPOCH)
    async with Outbox(tmp / "outbox.db") as box:
        try:
            await source.sync_once(box)
        finally:
            await source.aclose()
    con = sqlite3.connect(tmp / "outbox.db")
    try:
        bodies = [bytes(b) for (b,) in con.execute("SELECT body FROM records ORDER BY seq")]
    finally:
        con.close()
    out = []
    for body in bodies:
        observed = orjson.loads(body)["observed_at"]
        out.append(body.replace(observed.encode(), b"<observed_at>"))
    return out


def unchained(bodies: list[bytes]) -> list[bytes]:
    """``bodies`` with each stored (chained) id replaced by the record's provisional id."""
    out = []
    for body in bodies:
        env = orjson.loads(body)
        provisional = str(uuid.uuid5(NS, f"{env['entity_id']}:{env['content_hash']}"))
        out.append(body.replace(env["id"].encode(), provisional.encode()))
    return out


# ---------------------------------------------------------------------- mqtt case


def mqtt_bodies() -> list[bytes]:
    """Envelopes the MQTT mapper makes of a few JSON and raw-value messages."""
    config = MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "client_id": "golden",
            "subscriptions": [
                {
                    "topic": "plant/{asset}/telemetry",
                    "asset": "{asset}",
                    "timestamp_path": "ts",
                    "points": [
                        {"name": "temp", "path": "t", "quality_path": "q", "unit": "degC"},
                        {"name": "count", "path": "/n/0", "type": "int", "scale": 2.0},
                    ],
                },
                {"topic": "raw/+", "format": "value", "points": [{"name": "level"}]},
            ],
        }
    )
    mapper = Mapper(SourceRef("mqtt-1", "mqtt", "plant-1"), config)
    messages = [
        ("plant/L1/telemetry", b'{"ts": 1790000000, "t": 21.5, "q": "good", "n": [3]}'),
        ("plant/L2/telemetry", b'{"ts": "2026-11-22T09:00:03.5+01:00", "t": "22", "n": [4]}'),
        ("plant/L1/telemetry", b'{"ts": 1790000000123, "t": 1e3, "n": [5]}'),
        ("raw/tank", b" 42.5 "),
    ]
    out: list[bytes] = []
    for topic, payload in messages:
        for rec in mapper.map(topic, payload, T0).records:
            out.append(rec.to_json())
    return out


def digest(bodies: list[bytes]) -> str:
    return hashlib.sha256(b"\n".join(bodies)).hexdigest()


# ---------------------------------------------------------------------- pinned values

GOLDEN: dict[str, list[str]] = {
    "connection_status": [
        "986d6470-7bac-57ec-8036-536736919b4f",
        "0f586884-df9e-5b54-b17b-04a145fb06cb",
        "sha256:904c639e8aae290c53307c59c2e854513b2273464036ea3fdfc405cc5c9df48b",
        "5a332b1e5f1589e47f15d20673b351a16dead41f3414f790c93203fc1bdf67ad",
    ],
    "entity_date_modified": [
        "a744ee1c-dadc-54ba-9dd0-6a8b111d9603",
        "be2f616a-7e89-5074-a81d-b2ba195d4ef1",
        "sha256:4832a0623f6515fceeaae62fab9df8a44b43e009966a3d53bf516a160dbc0fee",
        "7b002ed2a480ce678fa0bf916733f36b17ce9bf9814ee6c1155033653c23b80d",
    ],
    "entity_delete_date_str": [
        "7905ff5c-55a0-5a20-999e-5d5ead3932f9",
        "27f41c24-ba01-529b-ab06-670934f73755",
        "sha256:6e8db2f686e622c292da7a047dc7b127eb0ee3c09c14e44fd6bd7ff8b86b1f58",
        "99c1b3825c7a28c8e7cc43e7aab8a96e835519f15004e98a8250eb31e6ae60c9",
    ],
    "entity_full": [
        "6d7bd69b-96ea-547d-a514-db3e83dc4493",
        "4c8d23a0-1523-5bc1-9d52-285322e4918e",
        "sha256:963cc0c02fc6dea6eba84514b236e275c58ac5b7918563fd7f448f5f768fabbb",
        "83c647bb0bad4580a13654a4bf98fe325baf6a122676d687e11a3b002694eecf",
    ],
    "entity_plain": [
        "c98eca47-75bc-5926-8163-9328d37a506a",
        "805cf0a8-389f-5f3d-a8af-57b97ceb546c",
        "sha256:455a63a8edef4bd41df8961fb58f77b8a5e3dc481d9ce1dd97e0b4369582fd4b",
        "3b3223c6517b7bf0111ceb12913ed7b8131e601953e7edf543beb8fbaf32d385",
    ],
    "reading": [
        "568ad078-e625-5e6f-abfc-714741e4b1ed",
        "3bd4e4a9-2c36-50d7-bf46-3c25ffdbafff",
        "sha256:3e6176e70a4a19f3c81c0a765d7e036cbce5a156243be67de19cac5944e90654",
        "fbfd692e93135dee98d57f18212d7fb04e990cd6a99f36d44446c37a5eba4524",
    ],
    "reading_custom_remote": [
        "fcdfba4d-4567-5668-8370-5afe46e4c48b",
        "0926907d-57e3-589c-b8df-97962fdfff1d",
        "sha256:53966ad598412ee8c838c720daa22fe43c8d7431b405b4a4ec98195b3dc4547b",
        "5fc5a10f40ed5c9dc795bc9c255d52ad5c14a32867ac10002cf641e37ec949b1",
    ],
}
FULL: dict[str, bytes] = {
    "entity_full": b'{"content_hash":"sha256:963cc0c02fc6dea6eba84514b236e275c58ac5b7918563fd7f44'
    b'8f5f768fabbb","custom":{"zz_contract":"C-77"},"data":{"asset_remote_id":"000'
    b'000010001","blob":"00ff6162","cost":1234.5,"due":"2026-12-01","empty":"","na'
    b'ive":"2026-11-21T08:15:00.999999Z","nested":{"a":{"y":"x"},"z":[1,null,true]'
    b'},"none":null,"priority":2,"qty":"12.500","started":"2026-11-21T08:15:00+01:'
    b'00","status":"released","tags":["a","b"],"title":"Replace door motor'
    b' \xc3\xbc\xe2\x82\xac"},"entity_id":"4c8d23a0-1523-5bc1-9d52-285322e4918e",'
    b'"entity_type":"work_order","id":"6d7bd69b-96ea-547d-a514-db3e83dc4493","modi'
    b'fied_precision":"day","observed_at":"2026-11-22T09:00:03.120Z","op":"upsert"'
    b',"remote_data":{"AUFNR":"000004001234","KTEXT":"Replace door motor","N":null'
    b'},"remote_id":"000004001234","source":{"name":"sap-prd","site":"plant-1000",'
    b'"system":"sap_ecc"},"source_modified_at":"2026-11-21T00:00:00.000Z"}',
    "reading": b'{"content_hash":"sha256:3e6176e70a4a19f3c81c0a765d7e036cbce5a156243be67de19cac59'
    b'44e90654","custom":{},"data":{"asset_remote_id":"L7","quality":"good","unit":"de'
    b'gC","value":71.25},"entity_id":"3bd4e4a9-2c36-50d7-bf46-3c25ffdbafff","entity_ty'
    b'pe":"meter_reading","id":"568ad078-e625-5e6f-abfc-714741e4b1ed","modified_precis'
    b'ion":"second","observed_at":"2026-11-22T09:00:03.120456Z","op":"upsert","remote_'
    b'id":"lift-7/motor_temp","source":{"name":"sap-prd","site":"plant-1000","system":'
    b'"sap_ecc"},"source_modified_at":"2026-11-22T09:00:03.120456Z"}',
}
SQL_UNCHAINED: dict[str, tuple[int, str]] = {
    "False": (7, "f8701d1a4abd69b7bd520b3abec159307c4c5a832fdabd0e44537667692df9ab"),
    "True": (7, "40c5b104a8bd10fcfbdea5012aae78dc8a4b6d87d8e5c7551987c7d77249fae2"),
}
SQL_GOLDEN: dict[str, tuple[int, str]] = {
    "False": (7, "c7de3f5ec32c3123b90ab8a67821cb6c9287119ff8e2c282262bde436fc47eda"),
    "True": (7, "d4f13202bd76295167b2b1a7c1b4890e24f07ebe7f6053f951d78499dd94782b"),
}
CHAINED: list[str] = [
    "71d0f051-0384-59c0-8fe2-97847955eddf",
    "97e8573d-94b7-5c5d-b105-f4114ab017ba",
    "010276de-d0d5-5835-a956-f1158762af3c",
]
MQTT_GOLDEN: tuple[int, str] = (
    7,
    "90a9c0054517a14f6ceab6703d5ff0c3005790a3c2785237c04d3ab30a7fe19f",
)


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("builder", BUILDERS)
def test_record_ids_hashes_and_envelopes_are_unchanged(builder: str) -> None:
    with using(builder):
        got = {name: fingerprint(rec) for name, rec in record_cases().items()}
    assert got == GOLDEN


@pytest.mark.parametrize("builder", BUILDERS)
def test_full_envelopes_are_unchanged(builder: str) -> None:
    with using(builder):
        cases = record_cases()
    for name, body in FULL.items():
        assert cases[name].to_json() == body


@pytest.mark.parametrize("builder", BUILDERS)
def test_envelopes_equal_the_reference_encoding(builder: str) -> None:
    with using(builder):
        cases = record_cases()
    for rec in cases.values():
        assert rec.to_json() == reference_json(rec)
        assert rec.content_hash == reference_hash(rec.op, rec.data, rec.custom, rec.remote_data)


@pytest.mark.parametrize("builder", BUILDERS)
async def test_sql_sync_envelopes_are_unchanged(tmp_path: Path, builder: str) -> None:
    for mapped in (False, True):
        with using(builder):
            bodies = await sql_bodies(tmp_path / str(mapped), mapped)
        assert (len(bodies), digest(bodies)) == SQL_GOLDEN[str(mapped)]
        assert (len(bodies), digest(unchained(bodies))) == SQL_UNCHAINED[str(mapped)]
        for body in bodies:  # seven entities, one version each: chained from the epoch
            env = orjson.loads(body)
            name = f"{env['entity_id']}:{env['content_hash']}:{EPOCH}"
            assert env["id"] == str(uuid.uuid5(NS, name))


def test_chained_ids_are_unchanged() -> None:
    """``id = uuid5(NS, f"{entity_id}:{content_hash}:{prev}")``, pinned: A, B, A of one
    entity from an epoch gives three ids, the third not the first."""
    a, b = record_cases()["entity_plain"], record_cases()["entity_full"]
    first = chain_id(a.entity_id, a.content_hash, EPOCH)
    second = chain_id(a.entity_id, b.content_hash, first)
    third = chain_id(a.entity_id, a.content_hash, second)
    assert first == str(uuid.uuid5(NS, f"{a.entity_id}:{a.content_hash}:{EPOCH}"))
    assert [first, second, third] == CHAINED


def test_mqtt_envelopes_are_unchanged() -> None:
    bodies = mqtt_bodies()
    assert (len(bodies), digest(bodies)) == MQTT_GOLDEN


_dicts = strategies.dicts


_times = st.none() | st.text() | st.datetimes(timezones=st.none() | st.just(UTC)) | st.dates()


@settings(max_examples=300)
@given(
    data=_dicts,
    custom=_dicts,
    remote=st.none() | _dicts,
    remote_id=st.text(),
    op=st.sampled_from(list(Op)),
    site=st.none() | st.text(),
    entity_type=st.sampled_from(list(EntityType)),
    modified=_times,
    observed=st.datetimes(timezones=st.none() | st.just(UTC)) | st.text(),
    precision=st.sampled_from(["second", "minute", "day", "none"]),
)
def test_any_entity_encodes_as_the_reference(
    data: dict[str, Any],
    custom: dict[str, Any],
    remote: dict[str, Any] | None,
    remote_id: str,
    op: Op,
    site: str | None,
    entity_type: EntityType,
    modified: Any,
    observed: Any,
    precision: Any,
) -> None:
    ref = SourceRef('src"ü', "sql", site)
    rec = Record.entity(
        ref,
        entity_type,
        remote_id,
        data,
        op=op,
        custom=custom,
        remote_data=remote,
        source_modified_at=modified,
        modified_precision=precision,
        observed_at=observed,
    )
    assert rec.content_hash == reference_hash(op, data, custom, remote)
    assert rec.to_json() == reference_json(rec)
    assert rec.id == str(uuid.uuid5(NS, f"{rec.entity_id}:{rec.content_hash}"))
    assert rec.entity_id == str(uuid.uuid5(NS, f"{ref.name}:{entity_type}:{remote_id}"))
    # A record built field by field (no encoding cached) encodes the same.
    fields = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec) if f.init}
    assert Record(**fields).to_json() == rec.to_json()


@settings(max_examples=200)
@given(data=_dicts, point=st.text(), at=st.datetimes(timezones=st.just(UTC)))
def test_any_reading_encodes_as_the_reference(
    data: dict[str, Any], point: str, at: datetime
) -> None:
    rec = Record.reading(SAP, EntityType.METER_READING, point, at, data)
    assert rec.content_hash == reference_hash("upsert", data, {}, None)
    assert rec.to_json() == reference_json(rec)
    assert rec.id == str(uuid.uuid5(NS, f"{SAP.name}:{point}:{rec.observed_at}:{rec.content_hash}"))


def _generate() -> None:  # pragma: no cover - run by hand, see the module docstring
    import asyncio  # noqa: PLC0415
    import pprint  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    cases = record_cases()
    print("GOLDEN: dict[str, list[str]] = " + pprint.pformat(
        {n: fingerprint(r) for n, r in cases.items()}, width=96))  # fmt: skip
    print("FULL: dict[str, bytes] = " + pprint.pformat(
        {n: cases[n].to_json() for n in ("entity_full", "reading")}, width=96))  # fmt: skip
    sql: dict[str, tuple[int, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mapped in (False, True):
            bodies = asyncio.run(sql_bodies(Path(tmp) / str(mapped), mapped))
            sql[str(mapped)] = (len(bodies), digest(bodies))
    print("SQL_GOLDEN: dict[str, tuple[int, str]] = " + pprint.pformat(sql, width=96))
    a, b = cases["entity_plain"], cases["entity_full"]
    chained = [chain_id(a.entity_id, a.content_hash, EPOCH)]
    chained.append(chain_id(a.entity_id, b.content_hash, chained[-1]))
    chained.append(chain_id(a.entity_id, a.content_hash, chained[-1]))
    print(f"CHAINED: list[str] = {chained!r}")
    bodies = mqtt_bodies()
    print(f"MQTT_GOLDEN: tuple[int, str] = {(len(bodies), digest(bodies))!r}")


if __name__ == "__main__":
    _generate()
    sys.exit(0)
