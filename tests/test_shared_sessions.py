"""Sessions in a shared store: the state codec (pure), and engines in this
process sharing a real redis-server: any engine applies any chunk with the
frames one engine gives, numbered retries are answered again and never
applied twice, raced chunks are each applied once, limits hold across
engines, and an unreachable store answers 503 and then serves on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from a2e import streaming
from a2e.backend import TorchBackend
from a2e.loudness import LoudnessMode
from engine import metrics
from engine.protocol import ChunkOutOfOrder, SessionLimitReached, SessionNotFound, StateUnavailable
from engine.service import InferenceService
from engine.redis_sessions import pieces_to_keep
from a2e.constants import WEIGHT_DECIMALS
from engine.protocol import ChunkResult
from engine.session_codec import (CodecError, audio_tail, decode_answer, decode_audio, decode_state, encode_answer,
                                  encode_audio, encode_state, pack, piece_samples, unpack)  # fmt: skip
from runtime.settings import Settings
from tests.cluster_parts import RedisServer
from tests.conftest import speech_like

TUNING = {"multipliers": {"JawOpen": 1.3}, "face_params": {"lowerFaceSmoothing": 0.05}}


def as_sent(frames: np.ndarray) -> np.ndarray:
    """Weights as every door renders them (what a stored answer keeps)."""
    return np.round(np.asarray(frames, dtype=np.float64), WEIGHT_DECIMALS)


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
    stored: list[bytes] = []  # the audio pieces as the store keeps them: each chunk's, the newest that hold a window
    pcm16 = [(np.round(c * 32767) / 32768).astype(np.float32) for c in chunks(40, 0.05, seed=2)]  # stored as integers
    for k, chunk in enumerate([*chunks(6, 0.45), *chunks(2, 2.5, seed=1), *pcm16]):
        a = streaming.tune(kept, streaming.push_chunk(kept, backend, chunk))
        received = moved.samples_received
        b = streaming.tune(moved, streaming.push_chunk(moved, backend, chunk))
        assert np.array_equal(a, b), f"chunk {k}"
        stored.append(audio_tail(moved, moved.samples_received - received))
        stored = stored[len(stored) - pieces_to_keep([piece_samples(p) for p in stored]) :]
        moved = decode_state(encode_state(moved), stored)  # as if every chunk went to another node
    assert kept.frames_sent == moved.frames_sent and kept.samples_received == moved.samples_received


def test_a_state_without_its_audio_is_small_and_its_audio_a_window_at_most():
    streams = InferenceService(Settings()).streams
    state = streams.new_state(0, 1, "continuous", LoudnessMode.OFF, None)
    state.context = (np.ones(40000, np.float32), np.arange(3000, dtype=np.float32))
    assert len(encode_state(state)) < 2000
    assert len(audio_tail(state, 10**6)) == 1 + 34133 * 4  # 3000 samples are not k/32768: float32
    assert np.array_equal(decode_audio(audio_tail(state, 3000)), np.arange(3000))
    decoded = decode_state(encode_state(state), [encode_audio(piece) for piece in state.context])
    assert len(decoded.context[0]) == 34133 and np.array_equal(decoded.previous_audio, state.previous_audio)
    assert decode_state(encode_state(state)).context == ()  # where a session stands needs no audio


def test_of_the_stored_frames_a_state_keeps_what_later_chunks_read(model):
    streams = InferenceService(Settings()).streams
    state = streams.new_state(0, 1, "continuous", LoudnessMode.OFF, None)
    for chunk in chunks(4, 1.0):
        streaming.push_chunk(state, TorchBackend(model), chunk)
    assert state.previous_frames.shape == (64, 52)
    assert len(encode_state(state)) < 2600  # 64 whole frames alone would be 13.3 KB
    decoded = decode_state(encode_state(state))
    assert np.array_equal(decoded.previous_frames[-5:], state.previous_frames[-5:])
    # A record written before the stored frames were cut down still reads.
    header, arrays = unpack(encode_state(state))
    arrays.pop("previous_tail"), arrays.pop("previous_eyes")
    old = decode_state(pack(header, {**arrays, "previous_frames": state.previous_frames}))
    assert np.array_equal(old.previous_frames, state.previous_frames)


def test_recent_audio_is_the_tail_of_the_context_whatever_its_pieces():
    state = streaming.StreamState(identity=0, rng=np.random.default_rng(0))
    pieces = [np.arange(k, k + n, dtype=np.float32) for k, n in ((0, 500), (500, 16000), (16500, 300))]
    state.context = tuple(pieces)
    whole = np.concatenate(pieces)
    for n in (1, 300, 301, 16300, 16301, len(whole), len(whole) + 10):
        assert np.array_equal(state.recent_audio(n), whole[-n:]), n
    assert np.shares_memory(state.recent_audio(300), pieces[-1])  # one piece: no copy
    assert len(state.recent_audio(0)) == 0
    state.context = ()
    assert len(state.recent_audio(100)) == 0


def test_audio_is_stored_losslessly_as_flac_only_where_16_bit_integers_are_exact():
    speech = ((np.round(np.clip(speech_like(1.0, seed=3), -1, 1) * 32767) + 0.0) / 32768).astype(np.float32)  # no -0.0
    pcm = (np.arange(-32768, 32768, 7, dtype=np.int32).astype(np.float32) / 32768).astype(np.float32)
    for samples, tag, most in ((speech, b"c", 0.8), (pcm, b"c", 0.2), (pcm[:1000], b"s", 1.0)):
        piece = encode_audio(samples)  # FLAC where it is worth it; 16-bit for a few samples
        assert piece[:1] == tag and len(piece) <= 1 + 2 * len(samples) * most and piece_samples(piece) == len(samples)
        assert decode_audio(piece).tobytes() == samples.tobytes()
    for inexact in (pcm * np.float32(0.9), np.array([1.0, 0.5], np.float32), np.array([np.nan], np.float32),
                    np.array([-0.0, 0.5], np.float32)):  # fmt: skip
        piece = encode_audio(inexact)
        assert len(piece) == 1 + 4 * len(inexact) and piece_samples(piece) == len(inexact)
        assert decode_audio(piece).tobytes() == inexact.tobytes()
    for broken in (b"x123", b"c\x10\x00\x00\x00not flac", encode_audio(speech)[:-100]):
        with pytest.raises(CodecError):
            decode_audio(broken)


def test_a_stored_answer_renders_as_the_answer_sent():
    rng = np.random.default_rng(1)  # weights that move smoothly, as faces do
    frames = (0.5 + 0.45 * np.sin(np.arange(30)[:, None] * rng.uniform(0.05, 0.4, 52) + rng.uniform(0, 6, 52))).astype(np.float32)
    stored = encode_answer(ChunkResult(frames, 4, 1.0, 3.0, "continuous"), 77)
    assert len(stored) < frames.nbytes * 0.7  # steps of 1e-6, frame to frame differences, deflated
    (answer, digest) = decode_answer(stored)
    assert np.array_equal(as_sent(answer.frames), as_sent(frames)) and answer.frames.dtype == np.float32
    assert (answer.chunk_index, answer.start_time, digest) == (4, 3.0, 77)
    big, _ = decode_answer(encode_answer(ChunkResult(frames * 1000, 1, 0.1, 0.0, "continuous"), 1))
    assert np.array_equal(as_sent(big.frames), as_sent(frames * 1000))
    for odd in (frames * 1e4, np.full((2, 52), np.nan, np.float32), np.zeros((0, 52), np.float32)):
        answer, _ = decode_answer(encode_answer(ChunkResult(odd, 1, 0.1, 0.0, "continuous"), 1))
        assert answer.frames.tobytes() == odd.tobytes()  # outside what float32 steps carry back: kept as they are


def test_pieces_to_keep_are_the_fewest_newest_that_hold_a_window():
    assert pieces_to_keep([]) == 0
    assert pieces_to_keep([16000, 16000]) == 2  # fewer than a window: all
    assert pieces_to_keep([16000, 16000, 16000]) == 3
    assert pieces_to_keep([16000, 16000, 16000, 16000]) == 3
    assert pieces_to_keep([5, 34133]) == 1


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


FAILOVER_S = 3.0  # how long the engines retry through a store's absence (--state-failover-s)


@pytest.fixture
async def engines(checkpoint, config_file, redis_server):
    """Two engines on one store (as two nodes), and one with its sessions in memory."""
    redis_server.flush()
    made = [engine(checkpoint, config_file, state=redis_server.url, max_sessions=4, max_sessions_per_client=3,
                   state_failover_s=FAILOVER_S) for _ in range(2)] + [engine(checkpoint, config_file)]  # fmt: skip
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


async def test_numbered_chunks_of_any_size_on_any_engine_give_the_frames_of_one_engine(engines, redis_server):
    a, b, memory = engines
    sid = (await a.open_session(2, 31, "continuous", client="c")).session_id
    ref = (await memory.open_session(2, 31, "continuous")).session_id
    sizes = [0.5, 0.05, 0.05, 3.0, 0.3, 1.0, 0.02, 2.2, 0.7, 0.1, 0.1, 0.1]
    audio = speech_like(sum(sizes) + 0.1, seed=8)
    cuts = np.cumsum([0, *[int(s * 16000) for s in sizes]])
    # Runs on one engine (which skips reading the store) and switches (which read it).
    route = [a, a, a, b, b, a, b, b, b, a, a, b]
    reads = _fetches()
    for k, (engine_, start, end) in enumerate(zip(route, cuts[:-1], cuts[1:])):
        got = await engine_.stream_chunk(sid, audio[start:end], chunk_index=k + 1)
        want = await memory.stream_chunk(ref, audio[start:end])
        assert got.chunk_index == k + 1 and np.array_equal(got.frames, want.frames), f"chunk {k + 1}"
    assert _fetches() - reads == 5  # one per switch of engine
    pieces = [piece_samples(p) for p in redis.Redis.from_url(redis_server.url).lrange(f"a2e:a:{sid}", 0, -1)]
    assert sum(pieces) >= 34133 > sum(pieces[1:]), pieces  # the audio a window needs, and no more pieces


def _fetches() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("a2e_state_store_seconds_count", {"op": "fetch"}) or 0.0


async def test_the_chunks_of_one_batch_are_written_in_one_round_trip(checkpoint, config_file, redis_server, engines):
    waiting = engine(checkpoint, config_file, state=redis_server.url, max_wait_ms=200.0)  # one batch for all four
    memory = engines[2]
    try:
        ids = [(await waiting.open_session(k, 40 + k, "continuous", client=f"c{k}")).session_id for k in range(4)]
        refs = [(await memory.open_session(k, 40 + k, "continuous")).session_id for k in range(4)]
        store = redis.Redis.from_url(redis_server.url)
        store.script_flush()  # as after a Redis restart: the first batch loads it again
        for round_ in range(2):
            audio = [chunks(2, seed=k)[round_] for k in range(4)]
            writes = _commits()
            got = await asyncio.gather(*(waiting.stream_chunk(sid, a, chunk_index=round_ + 1) for sid, a in zip(ids, audio)))
            assert _commits() - writes == 1  # the batch's four writes in one operation
            assert store.script_exists(waiting.streams.store._scripts["commit"].sha) == [True]
            # As one engine gives them one by one, to within what a batch's makeup changes (not bit for bit).
            for sid, ref, a, answer in zip(ids, refs, audio, got):
                assert answer.chunk_index == round_ + 1
                assert np.abs(answer.frames - (await memory.stream_chunk(ref, a)).frames).max() < 1e-5
        assert (await engines[0].session_position(ids[3])).chunks == 2  # written for every engine to see
    finally:
        waiting.close()
        await waiting.streams.store.aclose()


def _commits() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("a2e_state_store_seconds_count", {"op": "commit"}) or 0.0


async def test_a_retried_chunk_is_answered_again_and_not_applied_twice(engines):
    a, b, _ = engines
    sid = (await a.open_session(0, 5, "continuous", client="c")).session_id
    one, two = chunks(2)
    first = await a.stream_chunk(sid, one, chunk_index=1)
    again = await b.stream_chunk(sid, one, chunk_index=1)  # the answer was lost: the client sends it again elsewhere
    assert again.chunk_index == 1 and np.array_equal(as_sent(again.frames), as_sent(first.frames))
    with pytest.raises(ChunkOutOfOrder) as ahead:
        await b.stream_chunk(sid, two, chunk_index=3)
    assert ahead.value.expected_chunk_index == 2 and "expects chunk_index 2" in str(ahead.value)
    with pytest.raises(ChunkOutOfOrder, match="other audio"):
        await a.stream_chunk(sid, two, chunk_index=1)
    second = await a.stream_chunk(sid, two, chunk_index=2)
    assert second.chunk_index == 2
    position = await b.session_position(sid)
    assert position.chunks == 2 and position.frames == len(first.frames) + len(second.frames)
    assert np.array_equal(as_sent(position.last.frames), as_sent(second.frames))


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
    assert np.array_equal(as_sent(same[0].frames), as_sent(same[1].frames)) and (await a.session_position(sid)).chunks == 3


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


async def test_a_store_that_stops_answering_is_unreachable_after_the_deadline_and_then_serves_on(engines, redis_server):
    import os
    import signal
    import time

    from engine.redis_sessions import OPERATION_TIMEOUT_S

    a, _, _ = engines
    sid = (await a.open_session(0, 2, "continuous", client="c")).session_id
    one, two = chunks(2)
    await a.stream_chunk(sid, one, chunk_index=1)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # alive, connected, silent: only a deadline notices
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="unreachable"):
            await a.stream_chunk(sid, two, chunk_index=2)
        # Tried for --state-failover-s, each try bounded by the operation's deadline.
        assert FAILOVER_S <= time.monotonic() - started < FAILOVER_S + OPERATION_TIMEOUT_S + 2
        assert a.stats()["state"]["reachable"] is False
        assert "no answer in" in a.stats()["state"]["detail"]
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    # Whether or not the write landed before the store stopped, the retry is applied once.
    again = await a.stream_chunk(sid, two, chunk_index=2)
    assert again.chunk_index == 2
    three = await a.stream_chunk(sid, chunks(3, seed=4)[2], chunk_index=3)
    assert three.chunk_index == 3 and a.stats()["state"]["reachable"] is True




async def _run_route(engines, route, seed: int) -> str:
    """Unnumbered chunks of one session sent as ``route`` says: (engine, store
    reads it makes, runs it makes again), each checked against one engine's frames."""
    a, _, memory = engines
    sid = (await a.open_session(3, seed, "continuous", client="c")).session_id
    ref = (await memory.open_session(3, seed, "continuous")).session_id
    audio = chunks(len(route), seed=seed)
    for k, (engine_, reads, again) in enumerate(route):
        before, conflicts = _fetches(), metrics.STATE_CONFLICTS._value.get()
        got = await engine_.stream_chunk(sid, audio[k])
        want = await memory.stream_chunk(ref, audio[k])
        assert got.chunk_index == k + 1 and np.array_equal(got.frames, want.frames), f"chunk {k + 1}"
        assert (_fetches() - before, metrics.STATE_CONFLICTS._value.get() - conflicts) == (reads, again), f"chunk {k + 1}"
    return sid


async def test_unnumbered_chunks_skip_the_store_read_while_they_stay_on_one_engine(engines):
    a, b, _ = engines
    await _run_route(engines, [
        (a, 1, 0), (a, 1, 0), (a, 0, 0), (a, 0, 0),  # two reads found the creator's copy current: then none
        (b, 1, 0),  # b has no copy
        (a, 1, 1),  # a's copy, moved on by b behind its back: refused by the version check, read, run again
        (b, 1, 0), (a, 1, 0),  # moving between engines: each reads first
        (a, 1, 0), (a, 1, 0), (a, 1, 0),  # a does not skip the read for this session again
        (b, 1, 0), (b, 1, 0), (b, 1, 0), (b, 0, 0),  # b, which never lost that bet, does once its reads find it current
    ], seed=12)  # fmt: skip


async def test_unnumbered_chunks_in_round_robin_read_first_and_none_runs_twice(engines):
    a, b, _ = engines
    await _run_route(engines, [(a, 1, 0), (b, 1, 0)] * 4 + [(a, 1, 0), (a, 1, 0), (b, 1, 0), (a, 1, 0)], seed=14)


async def test_an_unnumbered_chunk_of_a_session_closed_elsewhere_is_not_found(engines):
    a, b, _ = engines
    sid = await _run_route(engines, [(a, 1, 0), (a, 1, 0), (a, 0, 0)], seed=13)
    reads = _fetches()
    await b.close_session(sid)
    with pytest.raises(SessionNotFound, match="closed or expired"):
        await a.stream_chunk(sid, chunks(4, seed=13)[3])  # run on a's copy without a read: its write finds it gone
    assert _fetches() == reads and a.streams.sessions.get(sid) is None
