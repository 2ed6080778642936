"""One line per finished stage of a long run, with the time spent so far and an estimate of what is left."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping

__all__ = ["StageProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3h05m``, ``4m07s`` or ``12.3s``: short enough for a log line."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class StageProgress:
    """Counts stages by kind (``finetune``, ``merge``) and prints elapsed / remaining time as each ends.

    The remaining time is the mean duration of the stages of each kind that did work in this run,
    times the stages of that kind still to come (an upper bound when some of those will be skipped).
    """

    def __init__(
        self,
        totals: Mapping[str, int],
        printer: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.totals = dict(totals)
        self.done: Counter[str] = Counter()
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.printer = printer
        self.clock = clock
        self.started = clock()
        self._stage_started = self.started

    def start(self) -> None:
        """Mark the beginning of the next stage."""
        self._stage_started = self.clock()

    def remaining(self) -> tuple[float, list[str]]:
        """Estimated seconds left for the timed kinds, and the kinds with stages left but no timing yet."""
        total, untimed = 0.0, []
        for kind, count in self.totals.items():
            left = count - self.done[kind]
            if left <= 0:
                continue
            if not self.durations[kind]:
                untimed.append(kind)
                continue
            total += left * sum(self.durations[kind]) / len(self.durations[kind])
        return total, untimed

    def _eta(self) -> str:
        if sum(self.done.values()) >= sum(self.totals.values()):
            return "done"
        seconds, untimed = self.remaining()
        timed = f"about {format_duration(seconds)} left" if seconds or not untimed else ""
        pending = f"{' and '.join(untimed)} stages not timed yet" if untimed else ""
        return " + ".join(part for part in (timed, pending) if part)

    def finish(self, kind: str, name: str, outcome: str, worked: bool = True) -> str:
        """Record one finished stage (``worked=False`` for a skipped one) and print its line."""
        now = self.clock()
        self.done[kind] += 1
        if worked:
            self.durations[kind].append(now - self._stage_started)
        index, count = sum(self.done.values()), sum(self.totals.values())
        eta = self._eta()
        took = f" in {format_duration(now - self._stage_started)}" if worked else ""
        line = f"[{index}/{count}] {kind} {name}: {outcome}{took} (elapsed {format_duration(now - self.started)}, {eta})"
        self.printer(line)
        return line
