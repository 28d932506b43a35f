"""Read planning: merge a device's points into the fewest Modbus requests.

Per table, points sorted by address are packed greedily into requests of at most 125
registers (or 2000 bits, or the device's lower limit), spanning unused addresses only up
to the device's maximum gap. Because a sub-range of a valid request is itself valid,
greedy packing in address order gives the fewest requests for those constraints.

When a device answers a merged request with exception 2 (illegal data address), the poller
asks :func:`split` for smaller requests and remembers them for that device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.sources.modbus.config import BIT_TABLES, DeviceConfig, PointConfig

TABLE_ORDER = ("coil", "discrete_input", "holding_register", "input_register")


@dataclass(frozen=True, slots=True)
class Request:
    """One read request: a table, a wire (0-based) start address, a count, the points."""

    table: str
    start: int
    count: int
    points: tuple[PointConfig, ...]
    base: int = 0

    @property
    def bits(self) -> bool:
        """True for coil and discrete-input reads."""
        return self.table in BIT_TABLES

    def offset(self, point: PointConfig) -> int:
        """Where ``point`` starts inside this request's answer."""
        return point.address - self.base - self.start

    def describe(self) -> str:
        """One line for ``check-config --explain`` and logs."""
        unit = "bits" if self.bits else "registers"
        used = len({a for p in self.points for a in _span(p, self.base)})
        names = ", ".join(p.name for p in self.points)
        return (
            f"{self.table} {self.start}..{self.start + self.count - 1} "
            f"({self.count} {unit}, {self.count - used} unused): {names}"
        )


def _span(point: PointConfig, base: int) -> range:
    start = point.address - base
    return range(start, start + point.width)


def _limits(device: DeviceConfig, table: str) -> tuple[int, int]:
    if table in BIT_TABLES:
        return device.max_bits_per_request, device.max_gap_bits
    return device.max_registers_per_request, device.max_gap_registers


def pack(
    table: str,
    points: Iterable[PointConfig],
    base: int,
    max_count: int,
    max_gap: int,
) -> list[Request]:
    """Greedy packing of one table's points into requests (see module docstring)."""
    ordered = sorted(points, key=lambda p: (p.address, p.width))
    out: list[Request] = []
    group: list[PointConfig] = []
    start = end = 0
    for point in ordered:
        p_start = point.address - base
        p_end = p_start + point.width
        if group and p_start - end <= max_gap and max(end, p_end) - start <= max_count:
            group.append(point)
            end = max(end, p_end)
            continue
        if group:
            out.append(Request(table, start, end - start, tuple(group), base))
        group, start, end = [point], p_start, p_end
    if group:
        out.append(Request(table, start, end - start, tuple(group), base))
    return out


def plan(device: DeviceConfig) -> list[Request]:
    """The requests of one poll of ``device``, in table then address order."""
    requests: list[Request] = []
    for table in TABLE_ORDER:
        points = [p for p in device.points if p.table == table]
        if points:
            max_count, max_gap = _limits(device, table)
            requests += pack(table, points, device.address_base, max_count, max_gap)
    return requests


def split(request: Request) -> list[Request]:
    """Smaller requests after an illegal-address answer to ``request``.

    First drop the gaps (requests over contiguous points only); a request without gaps
    splits into one request per address range (points sharing a range stay together).
    A single-range request cannot split: the result is empty.
    """
    no_gaps = pack(request.table, request.points, request.base, request.count, 0)
    if len(no_gaps) > 1:
        return no_gaps
    ranges: dict[tuple[int, int], list[PointConfig]] = {}
    for point in request.points:
        span = _span(point, request.base)
        ranges.setdefault((span.start, len(span)), []).append(point)
    if len(ranges) <= 1:
        return []
    return [
        Request(request.table, start, count, tuple(pts), request.base)
        for (start, count), pts in sorted(ranges.items())
    ]


def minimum_requests(device: DeviceConfig) -> int:
    """A lower bound on the requests any plan needs: per table, the distinct addresses
    in use divided by the largest request (benchmarks compare plans against it)."""
    total = 0
    for table in TABLE_ORDER:
        used = {a for p in device.points if p.table == table for a in _span(p, device.address_base)}
        if used:
            max_count, _ = _limits(device, table)
            total += -(-len(used) // max_count)
    return total


def explain_device(name: str, device: DeviceConfig, requests: list[Request]) -> str:
    """Human text: a device's planned requests."""
    lines = [
        f"device {name}: unit {device.unit_id} on {device.connection}, every "
        f"{device.interval:g}s, {len(device.points)} points in {len(requests)} requests "
        f"(lower bound {minimum_requests(device)}; 0-based wire addresses)"
    ]
    lines += [f"  {r.describe()}" for r in requests]
    return "\n".join(lines)
