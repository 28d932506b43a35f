# Types of the optional C module built from agent/_envelope.c (see agent/records.py).

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
def chain(
    ns: bytes,
    entity_id: str,
    content_hash: str,
    prev: str,
    body: bytes,
    at: int,
    provisional: str,
    /,
) -> tuple[str, bytes] | None: ...
