"""What a streaming session keeps of the chunks it sent, so that it can send
them again when the server's store has lost them (a failover to a replica
that lacked the last writes): the newest ``keep_s`` seconds of audio, with
the answers they got.

The one idea: a replayed chunk must give back the answer the caller
already has (the session's state, its random generator included, is what
the store rolled back to), so replaying is checked, never trusted, and the
caller is given no frame twice. "The same" is to within ``TOLERANCE``: a
chunk run again may share its batch with other sessions' chunks, and a
batch of another size rounds the model's float32 sums differently (up to
~5e-7 before the answer's six decimals); a wrong state differs by far more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

TOLERANCE = 1e-5


class ReplayError(RuntimeError):
    """The session cannot be brought back to where its caller is: the lost
    chunks are older than what was kept, or a replayed chunk answered other
    frames than the first time."""


@dataclass
class Sent:
    index: int
    audio: bytes
    pcm: bool
    frames: list
    seconds: float


class SentChunks:
    def __init__(self, keep_s: float = 10.0) -> None:
        self.keep_s = keep_s
        self.items: deque[Sent] = deque()
        self.seconds = 0.0

    def add(self, index: int, audio: bytes, pcm: bool, answer: dict) -> None:
        seconds = float(answer.get("metadata", {}).get("audio_length", 0.0))
        self.items.append(Sent(index, audio, pcm, answer["frames"], seconds))
        self.seconds += seconds
        while len(self.items) > 1 and self.seconds - self.items[0].seconds >= self.keep_s:
            self.seconds -= self.items.popleft().seconds

    def since(self, index: int) -> list[Sent]:
        """The chunks from ``index`` on, oldest first; ReplayError where they reach back past what was kept."""
        if not self.items or self.items[0].index > index:
            oldest = self.items[0].index if self.items else None
            raise ReplayError(
                f"the server's session store lost this session's chunks from chunk {index} on, but only the last "
                f"{self.keep_s:g} s (from chunk {oldest}) were kept to send again; raise replay_s, or start a new session")  # fmt: skip
        return [item for item in self.items if item.index >= index]

    @staticmethod
    def check(item: Sent, answer: dict) -> None:
        if not _close(answer["frames"], item.frames):
            raise ReplayError(f"chunk {item.index} sent again gave other frames than the first time: the session's "
                              "state on the server is not the one those frames came from")  # fmt: skip


def _close(a: list[dict], b: list[dict]) -> bool:
    """Frames (``{"time", "weights"}``) at the same times with weights within TOLERANCE."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x["time"] != y["time"] or len(x["weights"]) != len(y["weights"]):
            return False
        if any(abs(u - v) > TOLERANCE for u, v in zip(x["weights"], y["weights"])):
            return False
    return True
