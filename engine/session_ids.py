"""Session ids that say where their session lives: a UUID string whose last
four hex digits are the index and generation of the engine that made it."""

from __future__ import annotations


def session_tag(index: int, generation: int) -> str:
    return f"{index % 256:02x}{generation % 256:02x}"


def engine_of(session_id: str) -> tuple[int, int] | None:
    """(engine index, generation) from a session id this project made, else None."""
    tail = session_id[-4:]
    if len(session_id) != 36 or len(tail) != 4:
        return None
    try:
        return int(tail[:2], 16), int(tail[2:], 16)
    except ValueError:
        return None
