# Types of the optional C module built from agent/_envelope.c (see agent/records.py).

from typing import Any

ABI: int

def build(
    ns: bytes,
    name_prefix: bytes,
    remote_id: bytes,
    remote_id_json: bytes,
    op_json: bytes,
    data: bytes,
    custom: bytes,
    remote_data: bytes | None,
    mid: bytes,
    precision: bytes,
    observed_json: bytes,
    src: bytes,
    modified_json: bytes,
    /,
) -> tuple[str, str, str, bytes]: ...
def link(
    ns: bytes,
    epoch: str,
    rows: list[tuple[Any, ...]],
    versions: list[tuple[str, str, str] | None],
    known: dict[str, tuple[str, str | None]],
    latest: dict[str, tuple[str, str]],
    /,
) -> tuple[list[tuple[Any, ...]], list[str | None], int]: ...
