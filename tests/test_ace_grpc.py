"""The Audio2Face-3D gRPC API (server/ace_grpc) on a real server, driven by a
client built from the protocol definitions: frames equal REST streaming's,
tuning changes exactly its channels, errors in the protocol's own terms,
the health service. With NVIDIA's own generated modules installed
(``.ci/run`` installs them), a client written against those checks the
wire format too."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import soxr

from a2e import audio as audio_io
from a2e import tuning
from a2e.constants import channel_index, frame_count
from server import responses
from server.ace_grpc import protocol as p
from tests.conftest import ENGLISH
from tests.test_end_to_end import free_port, start, stop

ROOT = Path(__file__).resolve().parent.parent
M = p.messages
HOP = 0.5


@pytest.fixture(scope="module", params=[[], ["--workers", "2", "--devices", "cpu,cpu"]], ids=["one-process", "2-workers-2-engines"])
def server(request):
    port, grpc_port = free_port(), free_port()
    env = dict(
        os.environ, A2E_LOG_LEVEL="warning", A2E_MAX_SESSIONS="6", A2E_MAX_AUDIO_S="6", A2E_STREAM_HOP_S=str(HOP),
        A2E_HEADER_TIMEOUT_S="1.5", A2E_SESSION_IDLE_TIMEOUT_S="2",
    )  # fmt: skip
    args = ["app.py", "--model", "a2e-lite", "--grpc-port", str(grpc_port), *request.param]
    proc = start(args, port, env)
    yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    stop(proc)


def english_s16(seconds: float, rate: int = 16000) -> np.ndarray:
    audio = audio_io.load(Path(ENGLISH).read_bytes())[: int(16000 * seconds)]
    if rate != 16000:
        audio = soxr.resample(audio, 16000, rate)
    return (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2")


def header(rate=16000, face=None, ints=None, multipliers=None, offsets=None, clamp=None, channels=1, bits=16):
    bs = M.BlendShapeParameters(bs_weight_multipliers=multipliers or {}, bs_weight_offsets=offsets or {})
    if clamp is not None:
        bs.enable_clamping_bs_weight = clamp
    return M.AudioWithEmotionStream(
        audio_stream_header=M.AudioWithEmotionStreamHeader(
            audio_header=p.audio.AudioHeader(samples_per_second=rate, bits_per_sample=bits, channel_count=channels),
            face_params=M.FaceParameters(float_params=face or {}, integer_params=ints or {}),
            blendshape_params=bs,
        )
    )


def audio_message(pcm: np.ndarray):
    return M.AudioWithEmotionStream(audio_with_emotion=M.AudioWithEmotion(audio_buffer=pcm.tobytes()))


END = M.AudioWithEmotionStream(end_of_audio=M.AudioWithEmotionStream.EndOfAudio())


@dataclass
class Result:
    names: list = field(default_factory=list)
    audio_header: object = None
    frames: list = field(default_factory=list)
    times: list = field(default_factory=list)
    echoed: bytearray = field(default_factory=bytearray)
    echo_times: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    status: object = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    frames_per_message: list = field(default_factory=list)

    @property
    def weights(self) -> np.ndarray:
        return np.array(self.frames, dtype=np.float32)


def run_stream(target, first, pcm=None, chunk=None, lockstep=False, end=True, rate=16000, options=()) -> Result:
    """One ProcessAudioStream call. ``lockstep``: send a chunk, wait for its frames, send the next.
    ``options``: the channel's arguments."""
    outbox: queue.Queue = queue.Queue()

    def requests_():
        while (m := outbox.get()) is not None:
            yield m

    result = Result()
    with grpc.insecure_channel(target, options=list(options)) as channel:
        call = p.services.A2FControllerServiceStub(channel).ProcessAudioStream(requests_(), timeout=60)
        answers = iter(call)

        def take(message) -> None:
            part = message.WhichOneof("stream_part")
            result.parts.append(part)
            if part == "animation_data_stream_header":
                result.names = list(message.animation_data_stream_header.skel_animation_header.blend_shapes)
                result.audio_header = message.animation_data_stream_header.audio_header
            elif part == "animation_data":
                result.frames_per_message.append(len(message.animation_data.skel_animation.blend_shape_weights))
                for w in message.animation_data.skel_animation.blend_shape_weights:
                    result.frames.append(list(w.values))
                    result.times.append(w.time_code)
                result.echo_times.append(message.animation_data.audio.time_code)
                result.echoed += message.animation_data.audio.audio_buffer
            elif part == "status":
                result.status = message.status

        try:
            outbox.put(first)
            if pcm is not None:
                step = chunk or rate
                if lockstep:
                    take(next(answers))  # the header answer
                for at in range(0, len(pcm), step):
                    outbox.put(audio_message(pcm[at : at + step]))
                    # One message per frame: wait for all the frames this much audio completes.
                    while lockstep and len(result.frames) < frame_count(min(at + step, len(pcm)), rate):
                        take(next(answers))
            if end:
                outbox.put(END)
            outbox.put(None)
            for message in answers:
                take(message)
        except grpc.RpcError as exc:
            result.code, result.details = exc.code(), exc.details()
        finally:
            outbox.put(None)
    return result


def as_rest(weights: np.ndarray) -> np.ndarray:
    """Frames as REST's JSON carries them (rounded to 6 decimals); gRPC sends the float32s."""
    return np.round(weights.astype(np.float64), responses.DECIMALS)


def rest_stream(http, pcm, chunk, seed, spec=None, id_idx=0):
    body = {"seed": seed, "id_idx": id_idx} if spec is None else {"seed": seed, "id_idx": id_idx, "tuning": spec}
    init = requests.post(http + "/api/infer_stream_init", json=body).json()
    frames = []
    for at in range(0, len(pcm), chunk):
        res = requests.post(
            http + "/api/infer_stream_chunk",
            files={"audio_chunk": ("c.pcm", pcm[at : at + chunk].tobytes())},
            data={"session_id": init["session_id"]},
        )
        assert res.status_code == 200, res.text
        frames += [f["weights"] for f in res.json()["frames"]]
    requests.delete(f"{http}/api/infer_stream_close/{init['session_id']}")
    return init, np.array(frames, dtype=np.float64)


def test_a_whole_clip_as_the_sample_clients_send_it(server):
    """1 s chunks as fast as they go, then end of audio: every frame once at
    k/30 s, the input audio echoed back whole, the event, then SUCCESS."""
    _, target = server
    pcm = english_s16(4.3)
    r = run_stream(target, header(ints={"seed": 1}), pcm)
    assert r.code == grpc.StatusCode.OK, r.details
    assert r.names == list(tuning.A2F_NAMES)
    assert r.audio_header.samples_per_second == 16000 and r.audio_header.bits_per_sample == 16
    assert len(r.frames) == 129 and all(len(f) == 52 for f in r.frames)  # ceil(4.3 x 30)
    assert r.times == pytest.approx([k / 30 for k in range(129)])
    assert bytes(r.echoed) == pcm.tobytes()
    assert r.echo_times == sorted(r.echo_times) and r.echo_times[0] == 0.0
    assert r.parts[0] == "animation_data_stream_header" and r.parts[-2:] == ["event", "status"]
    assert r.status.code == p.status.Status.SUCCESS and "129 frames" in r.status.message
    # As Audio2Face-3D sends them, and as its clients count them (--print-fps): one frame per message,
    # each with the input audio of its own 1/30 s.
    assert r.parts.count("animation_data") == 129 and r.frames_per_message == [1] * 129
    assert r.echo_times == pytest.approx([round(k * 16000 / 30 + 0.4999) / 16000 for k in range(129)])


def test_frames_grouped_per_message_when_the_operator_asks(server):
    """--grpc-frames-per-message 15: the same frames and audio, in a fifteenth of the messages."""
    _, target = server
    pcm = english_s16(4.3)
    one = run_stream(target, header(ints={"seed": 1}), pcm)
    port, grpc_port = free_port(), free_port()
    proc = start(["app.py", "--model", "a2e-lite", "--grpc-port", str(grpc_port), "--grpc-frames-per-message", "15",
                  "--stream-hop-s", str(HOP)], port, dict(os.environ, A2E_LOG_LEVEL="warning"))  # fmt: skip
    try:
        grouped = run_stream(f"127.0.0.1:{grpc_port}", header(ints={"seed": 1}), pcm)
    finally:
        stop(proc)
    assert grouped.code == grpc.StatusCode.OK, grouped.details
    assert np.array_equal(grouped.weights, one.weights) and bytes(grouped.echoed) == bytes(one.echoed) == pcm.tobytes()
    assert max(grouped.frames_per_message) == 15 and sum(grouped.frames_per_message) == 129
    assert len(grouped.frames_per_message) < 129 // 7


def test_frames_equal_rest_streaming_of_the_same_chunks(server):
    http, target = server
    pcm = english_s16(3.0)
    chunk = int(16000 * HOP)
    got = run_stream(target, header(ints={"seed": 7, "id_idx": 2}), pcm, chunk=chunk, lockstep=True)
    assert got.code == grpc.StatusCode.OK, got.details
    _, want = rest_stream(http, pcm, chunk, 7, id_idx=2)
    assert len(got.frames) == len(want) == 90
    assert np.array_equal(as_rest(got.weights), want)


def test_other_sample_rates_are_resampled(server):
    _, target = server
    pcm = english_s16(2.0, rate=44100)
    r = run_stream(target, header(rate=44100), pcm, chunk=44100)
    assert r.code == grpc.StatusCode.OK, r.details
    assert len(r.frames) == 60 and bytes(r.echoed) == pcm.tobytes()
    assert r.audio_header.samples_per_second == 44100


def test_tuning_changes_exactly_its_channels_and_matches_rest(server):
    http, target = server
    pcm = english_s16(2.0)
    chunk = int(16000 * HOP)
    plain = run_stream(target, header(ints={"seed": 3}), pcm, chunk=chunk, lockstep=True).weights
    face = {"lowerFaceStrength": 1.5, "lipOpenOffset": 0.1, "skinStrength": 1.1}
    mult, offs = {"EyeBlinkLeft": 0.0, "BrowInnerUp": 2.0, "TongueTipUp": 0.5}, {"CheekPuff": 0.2}
    r = run_stream(target, header(ints={"seed": 3}, face=face, multipliers=mult, offsets=offs), pcm, chunk=chunk, lockstep=True)
    assert r.code == grpc.StatusCode.OK, r.details
    got = r.weights
    lower = [i for i, n in enumerate(tuning.A2F_NAMES) if n.startswith(("Jaw", "Mouth", "CheekPuff", "Tongue"))]
    want = plain.astype(np.float64)
    want[:, lower] *= 1.5
    want[:, channel_index("mouthClose")] -= 0.1
    want[:, channel_index("eyeBlinkLeft")] = 0.0
    want[:, channel_index("browInnerUp")] *= 2.0
    want[:, channel_index("cheekPuff")] += 0.2
    assert np.allclose(got, want, atol=1e-6)
    untouched = [i for i in range(52) if i not in lower and i not in (channel_index("eyeBlinkLeft"), channel_index("browInnerUp"))]
    assert np.array_equal(got[:, untouched], plain[:, untouched])
    assert "face_params.skinStrength" in r.status.message and "TongueTipUp" in r.status.message
    # The same tuning through the REST session: the same frames.
    spec = {"face_params": face, "multipliers": mult, "offsets": offs}
    init, rest = rest_stream(http, pcm, chunk, 3, spec)
    assert "face_params.skinStrength" in init["tuning_ignored"]
    assert np.array_equal(rest, as_rest(got))


def test_clamping_and_smoothing_through_the_header(server):
    _, target = server
    pcm = english_s16(2.0)
    plain = run_stream(target, header(ints={"seed": 5}), pcm, chunk=8000, lockstep=True).weights
    clamped = run_stream(target, header(ints={"seed": 5}, multipliers={"JawOpen": 40.0}, clamp=True), pcm, chunk=8000, lockstep=True).weights
    assert clamped.min() >= 0 and clamped.max() <= 1 and clamped[:, channel_index("jawOpen")].max() == 1.0
    smooth = run_stream(target, header(ints={"seed": 5}, face={"lowerFaceSmoothing": 0.1}), pcm, chunk=8000, lockstep=True).weights
    jaw = channel_index("jawOpen")
    assert np.abs(np.diff(smooth[:, jaw])).sum() < np.abs(np.diff(plain[:, jaw])).sum()
    brow = channel_index("browInnerUp")
    assert np.array_equal(smooth[:, brow], plain[:, brow])  # the upper face is not smoothed


@pytest.mark.parametrize(
    "first,code,words",
    [
        (audio_message(np.zeros(160, "<i2")), grpc.StatusCode.INVALID_ARGUMENT, "first message must be an audio_stream_header"),
        (header(channels=2), grpc.StatusCode.INVALID_ARGUMENT, "bad audio header: 2 channels"),
        (header(bits=8), grpc.StatusCode.INVALID_ARGUMENT, "16 only"),
        (header(rate=4000), grpc.StatusCode.INVALID_ARGUMENT, "sample rate out of range"),
        (M.AudioWithEmotionStream(audio_stream_header=M.AudioWithEmotionStreamHeader()), grpc.StatusCode.INVALID_ARGUMENT, "no audio_header"),
        (header(multipliers={"JawOpenn": 1.0}), grpc.StatusCode.INVALID_ARGUMENT, "unknown blend shape 'JawOpenn'"),
        (header(face={"lowerFaceStrength": 9.0}), grpc.StatusCode.INVALID_ARGUMENT, "between 0 and 2"),
        (header(ints={"id_idx": 99}), grpc.StatusCode.INVALID_ARGUMENT, "id_idx must be between"),
    ],
)
def test_bad_headers_are_refused_in_the_protocols_terms(server, first, code, words):
    _, target = server
    r = run_stream(target, first, english_s16(0.5))
    assert r.code == code and words in r.details
    assert r.status is not None and r.status.code == p.status.Status.ERROR and words in r.status.message
    assert "animation_data" not in r.parts


def test_a_second_header_and_a_too_long_stream_are_refused(server):
    _, target = server
    with grpc.insecure_channel(target) as channel:
        call = p.services.A2FControllerServiceStub(channel).ProcessAudioStream(
            iter([header(), audio_message(english_s16(0.2)), header(), END]), timeout=30
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected audio_stream_header after the header" in caught.value.details()
    empty = run_stream(target, header(), None, end=False)  # a header, then the client closes: an empty clip
    assert empty.code == grpc.StatusCode.OK and empty.frames == [] and empty.status.code == p.status.Status.SUCCESS
    long = run_stream(target, header(), english_s16(8.0))  # the fixture's --max-audio-s is 6
    assert long.code == grpc.StatusCode.INVALID_ARGUMENT and "audio too long: the limit is 6 s" in long.details


def test_a_busy_server_answers_resource_exhausted(server):
    """Six sessions per engine at most (the fixture's --max-sessions): the next stream is told."""
    _, target = server
    outboxes, calls, refused = [], [], None
    with grpc.insecure_channel(target) as channel:
        stub = p.services.A2FControllerServiceStub(channel)
        while refused is None and len(calls) < 13:
            box: queue.Queue = queue.Queue()
            box.put(header())
            call = stub.ProcessAudioStream(iter(box.get, None), timeout=30)
            first = next(call)
            if first.WhichOneof("stream_part") == "status":
                with pytest.raises(grpc.RpcError) as caught:
                    next(call)
                refused = caught.value
                box.put(None)
            else:
                outboxes.append(box)
                calls.append(call)
        for box in outboxes:
            box.put(END)
            box.put(None)
        for call in calls:  # the open streams are unharmed
            assert [m.WhichOneof("stream_part") for m in call][-1] == "status"
    assert len(calls) in (6, 12)  # one engine or two
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in refused.details()
    assert first.status.code == p.status.Status.ERROR


def test_silence_is_cut_off(server):
    """No header within --header-timeout-s; after the header, nothing for --session-idle-timeout-s."""
    _, target = server
    for first in (None, header()):
        with grpc.insecure_channel(target) as channel:
            box: queue.Queue = queue.Queue()
            if first is not None:
                box.put(first)
            call = p.services.A2FControllerServiceStub(channel).ProcessAudioStream(iter(box.get, None), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            box.put(None)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert ("no audio_stream_header within 1.5 s" if first is None else "no message for 2 s") in caught.value.details()


def test_the_websocket_and_rest_sessions_take_the_same_tuning(server):
    from websockets.sync.client import connect

    http, target = server
    pcm = english_s16(1.5)
    spec = {"face_params": {"upperFaceStrength": 1.4, "blinkOffset": 0.1}, "multipliers": {"mouthFunnel": 1.3}, "clamp": True}
    grpc_frames = run_stream(
        target, header(ints={"seed": 11}, face=spec["face_params"], multipliers=spec["multipliers"], clamp=True),
        pcm, chunk=8000, lockstep=True,
    ).weights  # fmt: skip
    with connect(http.replace("http://", "ws://") + "/api/stream", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "seed": 11, "hop": HOP, "tuning": spec}))
        assert json.loads(ws.recv(10))["tuning_ignored"] == []
        got = []
        for at in range(0, len(pcm), 8000):
            ws.send(pcm[at : at + 8000].tobytes())
            got += [f["weights"] for f in json.loads(ws.recv(30))["frames"]]
        ws.send(json.dumps({"type": "end"}))
    assert np.array_equal(np.array(got), as_rest(grpc_frames))
    bad = requests.post(http + "/api/infer_stream_init", json={"tuning": {"multipliers": {"jaw": 2}}})
    assert bad.status_code == 422 and "unknown blend shape 'jaw'" in bad.json()["detail"]
    plain = requests.post(http + "/api/infer_stream_init", json={}).json()
    assert "tuning_ignored" not in plain  # the document's answer, unchanged without tuning
    requests.delete(f"{http}/api/infer_stream_close/{plain['session_id']}")


def test_health_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, target = server
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", p.SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _nvidia_modules_installed() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import nvidia_audio2face_3d.messages_pb2"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _nvidia_modules_installed(), reason="NVIDIA's nvidia-audio2face-3d is not installed (.ci/run installs it)")
def test_a_client_on_nvidias_own_generated_modules(server, tmp_path):
    """tests/nvidia_stub_client.py speaks through NVIDIA's published classes
    (another process: both sets of classes cannot share one)."""
    _, target = server
    pcm = english_s16(3.0)
    clip = tmp_path / "clip.raw"
    clip.write_bytes(pcm.tobytes())
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "nvidia_stub_client.py"), target, str(clip), "16000", "9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)
    ours = run_stream(target, header(ints={"seed": 9}, face=theirs["face_params"], multipliers=theirs["multipliers"]), pcm, chunk=16000, lockstep=True)
    assert theirs["status"] == "SUCCESS" and theirs["names"] == list(tuning.A2F_NAMES)
    assert theirs["frames"] == 90 and theirs["echoed_bytes"] == pcm.nbytes
    assert np.array_equal(np.array(theirs["weights"], dtype=np.float32), ours.weights)
