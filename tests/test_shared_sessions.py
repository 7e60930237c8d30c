"""Sessions in a shared store: the state codec (pure), and engines in this
process sharing a real redis-server: any engine applies any chunk with the
frames one engine gives, numbered retries are answered again and never
applied twice, raced chunks are each applied once, limits hold across
engines, and an unreachable store answers 503 and then serves on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from a2e import streaming
from a2e.backend import TorchBackend
from a2e.loudness import LoudnessMode
from engine import metrics
from engine.protocol import ChunkOutOfOrder, SessionLimitReached, SessionNotFound, StateUnavailable
from engine.service import InferenceService
from engine.session_codec import CodecError, decode_state, encode_state
from runtime.settings import Settings
from tests.cluster_parts import RedisServer
from tests.conftest import speech_like

TUNING = {"multipliers": {"JawOpen": 1.3}, "face_params": {"lowerFaceSmoothing": 0.05}}


def chunks(n: int, seconds: float = 0.7, seed: int = 0) -> list[np.ndarray]:
    audio = speech_like(n * seconds, seed=seed)
    step = int(seconds * 16000)
    return [audio[i : i + step] for i in range(0, len(audio), step)]


# -- the codec ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,loudness,tuning", [("continuous", "off", None), ("continuous", "gates", TUNING),
                                                  ("reference", "off", None), ("continuous", "normalize", TUNING)])  # fmt: skip
def test_a_decoded_state_gives_the_same_frames_bit_for_bit(model, mode, loudness, tuning):
    backend = TorchBackend(model)
    streams = InferenceService(Settings()).streams
    kept = streams.new_state(3, 1234, mode, LoudnessMode(loudness), tuning)
    moved = streams.new_state(3, 1234, mode, LoudnessMode(loudness), tuning)
    for k, chunk in enumerate(chunks(6, 0.45)):
        a = streaming.tune(kept, streaming.push_chunk(kept, backend, chunk))
        b = streaming.tune(moved, streaming.push_chunk(moved, backend, chunk))
        assert np.array_equal(a, b), f"chunk {k}"
        moved = decode_state(encode_state(moved))  # as if every chunk went to another node
    assert kept.frames_sent == moved.frames_sent and kept.samples_received == moved.samples_received


def test_a_state_is_a_window_of_audio_and_a_little_more():
    streams = InferenceService(Settings()).streams
    state = streams.new_state(0, 1, "continuous", LoudnessMode.OFF, None)
    state.context = (np.ones(40000, np.float32), np.ones(3000, np.float32))
    blob = encode_state(state)
    assert 34133 * 4 < len(blob) < 34133 * 4 + 2000
    assert len(decode_state(blob).context[0]) == 34133


def test_bytes_that_are_not_a_state_are_refused():
    with pytest.raises(CodecError):
        decode_state(b"{\"not\": \"a state\"}")


# -- engines sharing one Redis ------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def engine(checkpoint, config_file, **overrides) -> InferenceService:
    settings = Settings(config_file=str(config_file), weight=str(checkpoint),
                        separation_model_dir=str(config_file.parent), **overrides).validate()  # fmt: skip
    service = InferenceService(settings)
    service.load()
    return service


@pytest.fixture
async def engines(checkpoint, config_file, redis_server):
    """Two engines on one store (as two nodes), and one with its sessions in memory."""
    redis_server.flush()
    made = [engine(checkpoint, config_file, state=redis_server.url, max_sessions=4, max_sessions_per_client=3)
            for _ in range(2)] + [engine(checkpoint, config_file)]  # fmt: skip
    yield made
    for service in made:
        service.close()
        store = getattr(service.streams, "store", None)
        if store is not None:
            await store.aclose()


async def test_chunks_spread_over_engines_give_the_frames_of_one_engine(engines):
    a, b, memory = engines
    ids = {}
    for name, svc in (("shared", a), ("memory", memory)):
        ids[name] = (await svc.open_session(1, 77, "continuous", LoudnessMode.GATES, "c", TUNING)).session_id
    got = {"shared": [], "memory": []}
    for k, chunk in enumerate(chunks(6)):
        shared = await (a, b)[k % 2].stream_chunk(ids["shared"], chunk)
        alone = await memory.stream_chunk(ids["memory"], chunk)
        assert shared.chunk_index == alone.chunk_index == k + 1 and shared.start_time == alone.start_time
        got["shared"].append(shared.frames)
        got["memory"].append(alone.frames)
    assert np.array_equal(np.concatenate(got["shared"]), np.concatenate(got["memory"]))
    closed = await b.close_session(ids["shared"])
    assert closed.chunks == 6 and closed.frames == sum(map(len, got["shared"]))
    assert await a.close_session(ids["shared"]) is None


async def test_a_retried_chunk_is_answered_again_and_not_applied_twice(engines):
    a, b, _ = engines
    sid = (await a.open_session(0, 5, "continuous", client="c")).session_id
    one, two = chunks(2)
    first = await a.stream_chunk(sid, one, chunk_index=1)
    again = await b.stream_chunk(sid, one, chunk_index=1)  # the answer was lost: the client sends it again elsewhere
    assert again.chunk_index == 1 and np.array_equal(again.frames, first.frames)
    with pytest.raises(ChunkOutOfOrder) as ahead:
        await b.stream_chunk(sid, two, chunk_index=3)
    assert ahead.value.expected_chunk_index == 2 and "expects chunk_index 2" in str(ahead.value)
    with pytest.raises(ChunkOutOfOrder, match="other audio"):
        await a.stream_chunk(sid, two, chunk_index=1)
    second = await a.stream_chunk(sid, two, chunk_index=2)
    assert second.chunk_index == 2
    position = await b.session_position(sid)
    assert position.chunks == 2 and position.frames == len(first.frames) + len(second.frames)
    assert np.array_equal(position.last.frames, second.frames)


async def test_a_retry_without_a_store_is_answered_again_too(engines):
    memory = engines[2]
    sid = (await memory.open_session(0, 5, "continuous")).session_id
    one = chunks(1)[0]
    first = await memory.stream_chunk(sid, one, chunk_index=1)
    again = await memory.stream_chunk(sid, one, chunk_index=1)
    assert np.array_equal(first.frames, again.frames) and memory.sessions.get(sid).chunks_done == 1


async def test_chunks_raced_to_two_engines_are_each_applied_once(engines):
    a, b, memory = engines
    sid = (await a.open_session(0, 9, "continuous", client="c")).session_id
    ref = (await memory.open_session(0, 9, "continuous")).session_id
    one, two = chunks(2)
    conflicts = metrics.STATE_CONFLICTS._value.get()
    answers = await asyncio.gather(a.stream_chunk(sid, one), b.stream_chunk(sid, two))
    assert metrics.STATE_CONFLICTS._value.get() > conflicts  # one was run again on the other's state
    assert sorted(r.chunk_index for r in answers) == [1, 2]
    # Applied in the order they were written: the same frames as that order on one engine.
    order = (one, two) if answers[0].chunk_index == 1 else (two, one)
    expected = [await memory.stream_chunk(ref, c) for c in order]
    by_index = sorted(answers, key=lambda r: r.chunk_index)
    for got, want in zip(by_index, expected):
        assert np.array_equal(got.frames, want.frames)
    # The same numbered chunk raced: applied once, both answers the same.
    three = chunks(3, seed=4)[2]
    same = await asyncio.gather(a.stream_chunk(sid, three, chunk_index=3), b.stream_chunk(sid, three, chunk_index=3))
    assert np.array_equal(same[0].frames, same[1].frames) and (await a.session_position(sid)).chunks == 3


async def test_session_limits_hold_across_engines(engines):
    a, b, _ = engines
    for svc in (a, b, a):
        await svc.open_session(0, None, "continuous", client="one")
    with pytest.raises(SessionLimitReached, match="per client across the cluster"):
        await b.open_session(0, None, "continuous", client="one")
    await b.open_session(0, None, "continuous", client="two")
    with pytest.raises(SessionLimitReached, match="the cluster has reached its limit of 4"):
        await a.open_session(0, None, "continuous", client="three")


async def test_an_engine_that_never_saw_the_session_serves_it_and_a_closed_one_is_gone(engines):
    a, b, _ = engines
    sid = (await a.open_session(0, 1, "continuous", client="c")).session_id
    await b.stream_chunk(sid, chunks(1)[0])
    await a.close_session(sid)
    with pytest.raises(SessionNotFound):
        await b.stream_chunk(sid, chunks(1)[0])


async def test_an_unreachable_store_answers_503_and_sessions_go_on_when_it_is_back(engines, redis_server):
    a, b, _ = engines
    sid = (await a.open_session(0, 2, "continuous", client="c")).session_id
    one, two = chunks(2)
    await a.stream_chunk(sid, one, chunk_index=1)
    redis_server.stop()
    try:
        with pytest.raises(StateUnavailable, match="unreachable"):
            await b.stream_chunk(sid, two, chunk_index=2)
        await b.check_state()
        assert b.stats()["state"]["reachable"] is False
    finally:
        redis_server.start()  # same port, its append-only file: the sessions are still there
    second = await b.stream_chunk(sid, two, chunk_index=2)
    assert second.chunk_index == 2
    await b.check_state()
    health = b.stats()["state"]
    assert health["reachable"] is True and health["store"] == "redis" and health["sessions"] >= 1
