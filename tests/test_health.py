"""agent.health: the written readiness rules, decided from typed component healths.

Readiness is one function of :class:`~agent.health.Component` objects; these cases are
the table in its module docstring and docs/operations.md ("Readiness"), one by one.
"""

from __future__ import annotations

from agent.health import (
    DISK_LOW,
    Component,
    Health,
    Kind,
    RestartLog,
    State,
    Tracker,
    parts,
    readiness,
    rollup,
    supervised,
)


class Clock:
    """A clock the test moves by hand (time is an input here, not something to wait for)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(state: State, reason: str | None = None, detail: str | None = None) -> Component:
    return Component(Kind.SOURCE, "s", Health(state, reason, 1.0, detail))


def devices(*states: State) -> tuple[Component, ...]:
    return parts(Kind.DEVICE, {f"d{i}": Health(s, "timeout") for i, s in enumerate(states)})


def decide(*components: Component) -> tuple[list[str], list[str]]:
    judged = readiness(components)
    assert judged.ready is (not judged.reasons)
    return judged.reasons, judged.warnings


def test_ready_states() -> None:
    for state in (State.OK, State.DISABLED):
        assert decide(source(state)) == ([], [])


def test_every_other_state_is_not_ready_and_says_why() -> None:
    not_ready = set(State) - {State.OK, State.DISABLED, State.DEGRADED}
    assert not_ready == {
        State.STARTING, State.RETRYING, State.BLOCKED, State.REAUTH, State.FAILED, State.STOPPED,
    }  # fmt: skip
    for state in not_ready:
        reasons, warnings = decide(source(state, "why"))
        assert reasons == [f"source s is {state.value}: why"], state
        assert warnings == []


def test_the_components_own_word_is_shown_beside_the_state() -> None:
    reasons, _ = decide(source(State.RETRYING, "connection refused", "reconnecting"))
    assert reasons == ["source s is retrying (reconnecting): connection refused"]


def test_degraded_is_ready_with_a_warning_unless_no_part_works() -> None:
    one_off = Component(
        Kind.SOURCE, "s", Health(State.DEGRADED, "devices not answering: d1"), devices(State.OK, State.RETRYING)
    )  # fmt: skip
    assert decide(one_off) == ([], ["source s is degraded: devices not answering: d1"])
    none_works = Component(
        Kind.SOURCE, "s", Health(State.DEGRADED, "x"), devices(State.RETRYING, State.FAILED)
    )
    assert decide(none_works) == (["source s: no device answers (d0, d1)"], [])


def test_the_outbox_and_the_delivery_objective() -> None:
    full = Component(Kind.OUTBOX, "", Health(State.BLOCKED, "sources are paused"))
    broken = Component(Kind.OUTBOX, "", Health(State.FAILED, "OperationalError: disk is full"))
    assert decide(full)[0] == ["outbox is over its byte budget: sources are paused"]
    assert decide(broken)[0] == ["outbox write failed: OperationalError: disk is full"]
    low = Health(State.BLOCKED, "disk free 64.0 KiB below reserve 1.0 MiB", detail=DISK_LOW)
    disk = Component(Kind.OUTBOX, "", low)
    assert decide(disk)[0] == ["outbox: disk free 64.0 KiB below reserve 1.0 MiB"]
    ok = Component(Kind.OUTBOX, "", Health(State.OK))
    late = readiness([ok], oldest_age=7200.0, max_oldest_age=3600.0)
    assert late.reasons == ["oldest undelivered record is 7200s old (limit 3600s)"]
    assert readiness([ok], oldest_age=10.0, max_oldest_age=3600.0).ready


def test_rollup_of_parts() -> None:
    """A source's own state from its parts' (Modbus devices, SQL entities)."""
    ok, starting, retrying = State.OK, State.STARTING, State.RETRYING
    assert rollup(Kind.DEVICE, ()) == (ok, None)
    assert rollup(Kind.DEVICE, devices(starting, starting)) == (starting, "no device answers yet")
    assert rollup(Kind.DEVICE, devices(ok, starting)) == (ok, None)
    assert rollup(Kind.DEVICE, devices(ok, retrying)) == (
        State.DEGRADED, "devices not answering: d1 (timeout)",
    )  # fmt: skip
    assert rollup(Kind.DEVICE, devices(retrying, retrying)) == (
        retrying, "no device answers (d0, d1)",
    )  # fmt: skip
    entities = parts(Kind.ENTITY, {"wo": Health(State.REAUTH, "28P01"), "eq": Health(ok)})
    assert rollup(Kind.ENTITY, entities) == (State.REAUTH, "entity wo: 28P01")
    failing = parts(Kind.ENTITY, {"wo": Health(retrying, "gone"), "eq": Health(ok)})
    assert rollup(Kind.ENTITY, failing) == (State.DEGRADED, "entities not syncing: wo (gone)")


def test_since_moves_with_the_state_not_with_the_reason() -> None:
    clock = Clock()
    tracker = Tracker(State.STARTING, "not started yet", clock)
    assert tracker.health.since == 1000.0
    clock.now = 1005.0
    tracker.set(State.RETRYING, "refused")
    clock.now = 1010.0
    tracker.set(State.RETRYING, "timed out")
    assert (tracker.health.reason, tracker.health.since) == ("timed out", 1005.0)
    tracker.set(State.OK)
    assert tracker.health.since == 1010.0


def test_a_crash_loop_is_failed_even_while_the_source_runs() -> None:
    clock = Clock()
    log = RestartLog(3, 600.0, clock)
    tracker = Tracker(State.STARTING, clock=clock)
    running = Health(State.OK)
    for _ in range(2):
        log.record()
        clock.now += 60
    assert supervised(running, tracker, log, True, "ValueError: bad") is running
    assert supervised(running, tracker, log, False, "ValueError: bad").state is State.FAILED
    log.record()  # the third restart within 10 minutes
    looping = supervised(running, tracker, log, True, "ValueError: bad")
    assert looping.state is State.FAILED
    assert looping.reason == "crash-looping: 3 restarts in 10 minutes; last error: ValueError: bad"
    clock.now += 600  # the first of the three leaves the window
    assert supervised(running, tracker, log, True, "ValueError: bad") is running
    log.reconfigure(2, 900.0)  # a reload: the restarts seen so far still count
    assert log.looping() == "crash-looping: 2 restarts in 15 minutes"
