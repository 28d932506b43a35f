"""Child process for the outbox crash test: append forever, report each committed batch.

Usage: python -m tests.crash_child DB START_BATCH PRODUCERS
Prints "ok <producer> <batch>" after each append returned (i.e. committed).
"""

from __future__ import annotations

import asyncio
import sys

from agent.outbox import Cursor, Outbox
from agent.records import EntityType, Record, SourceRef

SRC = SourceRef("crash", "test", None)
PER_BATCH = 7


def batch_records(producer: int, batch: int) -> list[Record]:
    return [
        Record.entity(
            SRC,
            EntityType.WORK_ORDER,
            f"p{producer}-b{batch}-r{i}",
            {"producer": producer, "batch": batch, "i": i, "pad": "x" * 300},
        )
        for i in range(PER_BATCH)
    ]


async def main(db: str, start: int, producers: int) -> None:
    async with Outbox(db) as box:

        async def produce(p: int) -> None:
            batch = start
            while True:
                await box.append(batch_records(p, batch), Cursor("crash", f"p{p}", batch))
                sys.stdout.write(f"ok {p} {batch}\n")
                sys.stdout.flush()
                batch += 1

        await asyncio.gather(*(produce(p) for p in range(producers)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
