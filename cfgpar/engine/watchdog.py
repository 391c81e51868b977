"""How the engine knows a rank has stopped making progress, and how it asks the ranks to stop.

A rank can fail three ways: it raises (it says so over its Pipe), it dies (its process sentinel
fires), or it hangs: stopped (SIGSTOP), frozen, or blocked for good inside a collective. The
third says nothing, so every rank keeps two clocks on a small shared-memory board that the
engine reads whenever it likes (control plane; no tensors, no draining, no Pipe traffic):

- a heartbeat, written every BEAT_S by a thread of the rank's own: a stopped or frozen process
  stops beating, a rank merely waiting in a collective for a slow peer beats on;
- a progress mark, written by the rank's main thread when a request starts, after each denoising
  step and when it answers, with the slowest gap between two marks seen so far.

The engine calls a rank hung when its heartbeat has been silent for `heartbeat_timeout_s`, or,
while it owes an answer, when its last mark is older than a deadline that adapts to the work:
`stall_factor` times the slowest gap seen so far, clamped to [`stall_floor_s`, `stall_ceiling_s`]
(the ceiling alone before any gap is known). A stuck 64-pixel edit is caught in seconds, a
20-minute video job with 30-second steps is not killed. The board's last slot is the stop flag:
ranks check it after each step and leave the request, so Ctrl-C stops them between steps.

time.monotonic() is CLOCK_MONOTONIC on Linux, one clock for every process of the machine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

BEAT_S = 0.25
"""Seconds between two heartbeats of a rank."""


@dataclass(frozen=True, kw_only=True)
class WatchdogConfig:
    """When the engine gives up on a silent rank. Engine-wide; not part of a request."""

    heartbeat_timeout_s: float = 10.0
    """A rank whose heartbeat thread has not beaten for this long is hung (stopped or frozen),
    whether it is working or idle. Its thread beats every 0.25 s."""
    stall_floor_s: float = 60.0
    """While a rank owes an answer, the least time allowed between two of its progress marks
    (request start, each denoising step, the answer)."""
    stall_factor: float = 10.0
    """The allowed time between two marks is this many times the slowest gap seen so far..."""
    stall_ceiling_s: float = 900.0
    """...and never more than this; before any gap has been seen, exactly this."""

    def __post_init__(self):
        for name in ("heartbeat_timeout_s", "stall_floor_s", "stall_factor", "stall_ceiling_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}.")
        if self.heartbeat_timeout_s < 4 * BEAT_S:
            raise ValueError(f"heartbeat_timeout_s must be at least {4 * BEAT_S} s (the ranks beat every "
                             f"{BEAT_S} s), got {self.heartbeat_timeout_s}.")
        if self.stall_floor_s > self.stall_ceiling_s:
            raise ValueError(f"stall_floor_s ({self.stall_floor_s}) must not exceed stall_ceiling_s "
                             f"({self.stall_ceiling_s}).")

    def stall_limit(self, slowest_gap_s: float) -> float:
        """Seconds allowed between two progress marks, given the slowest gap seen so far (0: none)."""
        if slowest_gap_s <= 0:
            return self.stall_ceiling_s
        return min(self.stall_ceiling_s, max(self.stall_floor_s, self.stall_factor * slowest_gap_s))


class Board:
    """The shared doubles: per rank [beat, mark, slowest gap], then the stop flag. Made by the
    engine (`Board.create`) and handed to each rank at spawn; each rank writes only its own
    three slots, the engine only the stop flag. A float64 store is one instruction: no lock."""

    def __init__(self, values, world_size: int):
        self.values, self.world_size = values, world_size

    @classmethod
    def create(cls, ctx, world_size: int) -> "Board":
        return cls(ctx.RawArray("d", 3 * world_size + 1), world_size)

    # ---- a rank's side -----------------------------------------------------------------
    def beat(self, rank: int) -> None:
        self.values[3 * rank] = time.monotonic()

    def mark(self, rank: int, *, first: bool = False) -> None:
        """A progress mark; `first` starts a request (its gap from the last answer is idle time)."""
        now, last = time.monotonic(), self.values[3 * rank + 1]
        if not first and last:
            self.values[3 * rank + 2] = max(self.values[3 * rank + 2], now - last)
        self.values[3 * rank + 1] = now

    @property
    def stopping(self) -> bool:
        return self.values[3 * self.world_size] != 0

    # ---- the engine's side -------------------------------------------------------------
    def ask_to_stop(self) -> None:
        self.values[3 * self.world_size] = 1.0

    def silent_for(self, rank: int, now: float) -> float:
        """Seconds since the rank's last heartbeat (0 before its first)."""
        beat = self.values[3 * rank]
        return now - beat if beat else 0.0

    def since_mark(self, rank: int, now: float, since: float) -> float:
        """Seconds since the rank's last mark, or since `since` if that is later."""
        return now - max(self.values[3 * rank + 1], since)

    def slowest_gap(self) -> float:
        return max(self.values[3 * r + 2] for r in range(self.world_size))


def start_heartbeat(board: Board, rank: int) -> None:
    """A rank's heartbeat thread, beating every BEAT_S (daemon: it ends with the process)."""

    def beat_forever() -> None:
        while True:
            board.beat(rank)
            time.sleep(BEAT_S)

    threading.Thread(target=beat_forever, name="cfgpar-heartbeat", daemon=True).start()


def find_hung(board: Board, config: WatchdogConfig, pending: list[int] = (), since: float = 0.0) -> str | None:
    """One sentence naming a hung rank, or None. `pending`: the ranks that owe an answer to what
    the engine sent at `since` (time.monotonic())."""
    now = time.monotonic()
    for rank in range(board.world_size):
        silent = board.silent_for(rank, now)
        if silent > config.heartbeat_timeout_s:
            return (f"rank {rank} has been silent for {silent:.1f} s (no heartbeat: the process is stopped or "
                    f"frozen; the limit is {config.heartbeat_timeout_s:g} s)")
    limit = config.stall_limit(board.slowest_gap())
    stalled = sorted(((board.since_mark(r, now, since), r) for r in pending), reverse=True)
    stalled = [(idle, r) for idle, r in stalled if idle > limit]
    if not stalled:
        return None
    # Ranks stuck together (one in its work, the others waiting for it in a collective) stop
    # marking within moments of each other: name them all, the longest silent first.
    names = ", ".join(str(r) for _, r in stalled)
    return (f"rank{'s' if len(stalled) > 1 else ''} {names} {'have' if len(stalled) > 1 else 'has'} made no progress "
            f"for {stalled[0][0]:.1f} s (their heartbeats go on; the limit is {limit:.0f} s, from the slowest step "
            "so far)")
