"""OpenAI's stop sequences on a text that arrives piece by piece: the answer ends before
the first stop sequence, which is not part of it. Text that could be the start of one is
held back until the next piece says whether it is."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False  # a stop sequence was found: the answer is complete

    def feed(self, text: str) -> str:
        """The part of the answer, up to `text`, that is certain now."""
        if self.stopped:
            return ""
        held = self._held + text
        found = [held.index(s) for s in self.stops if s in held]
        if found:
            self.stopped, self._held = True, ""
            return held[: min(found)]
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0
        )
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the answer: no stop sequence followed it."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
