"""The document's real-time example: one second of 16 kHz 16-bit mono audio
at a time from the microphone (pyaudio), sent as raw PCM. ``--file F``
reads the seconds from a sound file instead (no microphone, or no pyaudio),
at real-time pace."""

import argparse
import time

import numpy as np
import requests

from _common import SAMPLE, URL

parser = argparse.ArgumentParser()
parser.add_argument("--file", help="a sound file standing in for the microphone (default: the shipped sample)")
parser.add_argument("--seconds", type=float, default=0, help="stop after this much audio (0: until the end / Ctrl-C)")
args = parser.parse_args()


def from_file(path):
    import soundfile as sf
    import soxr

    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = soxr.resample(audio.mean(axis=1), sr, 16000) if sr != 16000 else audio.mean(axis=1)
    pcm = (np.clip(mono, -1, 32767 / 32768) * 32768).astype("<i2")
    for i in range(0, len(pcm), 16000):
        yield pcm[i : i + 16000].tobytes()
        time.sleep(len(pcm[i : i + 16000]) / 16000)  # as a microphone would deliver it


def from_microphone():
    import pyaudio

    p = pyaudio.PyAudio()
    stream = p.open(format=pyaudio.paInt16, channels=1, rate=16000, input=True, frames_per_buffer=16000)
    try:
        while True:
            yield stream.read(16000)  # 录制1秒音频
    finally:
        stream.close()


import importlib.util

have_microphone = args.file is None and importlib.util.find_spec("pyaudio") is not None
source = from_microphone() if have_microphone else from_file(args.file or SAMPLE)

session_id = requests.post(f"{URL}/api/infer_stream_init", json={"id_idx": 0}).json()["session_id"]
sent = 0.0
try:
    for audio_data in source:
        # Raw 16 kHz s16le PCM; the fields say so (the server would also recognise it).
        response = requests.post(
            f"{URL}/api/infer_stream_chunk",
            files={"audio_chunk": ("chunk.pcm", audio_data)},
            data={"session_id": session_id, "sample_rate": 16000, "encoding": "s16le", "channels": 1},
        )
        response.raise_for_status()
        blendshapes = response.json()  # 使用返回的blendshape驱动3D模型
        sent += len(audio_data) / 32000
        print(f"{sent:5.1f} s: {blendshapes['metadata']['frame_count']} frames, "
              f"jawOpen {max(f['weights'][24] for f in blendshapes['frames']):.2f} at most")
        if args.seconds and sent >= args.seconds:
            break
finally:
    requests.delete(f"{URL}/api/infer_stream_close/{session_id}")  # 清理
