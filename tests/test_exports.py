"""Exports (a2e/exports.py), each read back by a real reader of its format
and compared with the frames: csv (Live Link Face), glTF (pygltflib),
name-keyed JSON, NDJSON."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pygltflib
import pytest

from a2e import exports
from a2e.constants import ARKIT_NAMES, channel_index

FRAMES = np.random.default_rng(0).uniform(0, 1, size=(75, 52)).astype(np.float32)


def test_live_link_face_csv():
    rows = list(csv.reader(io.StringIO(exports.live_link_csv(FRAMES).decode())))
    head, body = rows[0], rows[1:]
    assert len(head) == 63 and head[:2] == ["Timecode", "BlendShapeCount"] and head[-9:] == list(exports.LIVE_LINK_ROTATIONS)
    assert head[2:21] == ["EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft",
                          "EyeSquintLeft", "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight",
                          "EyeLookOutRight", "EyeLookUpRight", "EyeSquintRight", "EyeWideRight", "JawForward", "JawLeft",
                          "JawRight", "JawOpen", "MouthClose"]  # fmt: skip
    assert sorted(h.lower() for h in head[2:54]) == sorted(n.lower() for n in ARKIT_NAMES)
    assert len(body) == 75 and all(r[1] == "61" for r in body)
    assert [r[0] for r in body[:3]] == ["00:00:00:00.000", "00:00:00:01.000", "00:00:00:02.000"]
    assert body[31][0] == "00:00:01:01.000" and body[74][0] == "00:00:02:14.000"
    for r, frame in zip(body, FRAMES):
        got = dict(zip(head[2:54], map(float, r[2:54])))
        for name in ARKIT_NAMES:
            assert got[name[0].upper() + name[1:]] == pytest.approx(frame[channel_index(name)], abs=1e-6)
        assert r[54:] == ["0"] * 9


def test_live_link_timecode():
    assert exports.live_link_timecode(3725 + 0.5) == "01:02:05:15.000"
    assert exports.live_link_timecode(1 / 60) == "00:00:00:00.500"


def test_gltf_reads_back_with_pygltflib():
    glb = pygltflib.GLTF2.load_from_bytes(exports.gltf_binary(FRAMES))
    mesh = glb.meshes[0]
    assert mesh.extras["targetNames"] == list(ARKIT_NAMES) and len(mesh.primitives[0].targets) == 52
    anim = glb.animations[0]
    channel, sampler = anim.channels[0], anim.samplers[anim.channels[0].sampler]
    assert channel.target.path == "weights" and channel.target.node == 0 and sampler.interpolation == "LINEAR"
    blob = glb.binary_blob()

    def read(index):
        acc = glb.accessors[index]
        view = glb.bufferViews[acc.bufferView]
        return np.frombuffer(blob[view.byteOffset : view.byteOffset + view.byteLength], dtype=np.float32)

    times, weights = read(sampler.input), read(sampler.output)
    assert np.allclose(times, np.arange(75) / 30) and glb.accessors[sampler.input].max == [pytest.approx(74 / 30)]
    assert np.array_equal(weights.reshape(75, 52), FRAMES)
    assert len(exports.gltf_binary(FRAMES)) % 4 == 0


def test_named_json_and_ndjson():
    named = json.loads(exports.json_named(FRAMES, id_idx=2))
    assert named["fps"] == 30 and named["frame_count"] == 75 and named["metadata"] == {"id_idx": 2}
    assert named["frames"][10]["blendshapes"]["jawOpen"] == pytest.approx(FRAMES[10, channel_index("jawOpen")], abs=1e-6)
    lines = exports.ndjson(FRAMES).decode().splitlines()
    head = json.loads(lines[0])
    assert head["names"] == list(ARKIT_NAMES) and head["frame_count"] == 75 and len(lines) == 76
    frame = json.loads(lines[40])
    assert frame["frame"] == 39 and frame["time"] == pytest.approx(39 / 30)
    assert np.allclose(frame["weights"], FRAMES[39], atol=1e-6)
