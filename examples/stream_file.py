"""The document's complete streaming example: one session, 1 s chunks of a
file (the last one shorter), each sent as a WAV, then the session closed."""

import io
import sys

import requests
import soundfile as sf

from _common import SAMPLE, URL

audio_path = sys.argv[1] if len(sys.argv) > 1 else SAMPLE

# 1. 初始化会话
session_id = requests.post(f"{URL}/api/infer_stream_init", json={"id_idx": 0}).json()["session_id"]
try:
    # 2. 加载完整音频
    audio, sr = sf.read(audio_path)
    # 3. 分块处理
    chunk_size = sr  # 1秒
    frames = 0
    for i in range(0, len(audio), chunk_size):
        chunk = audio[i : i + chunk_size]
        buffer = io.BytesIO()  # in memory: no temporary files left behind
        sf.write(buffer, chunk, sr, format="WAV")
        response = requests.post(
            f"{URL}/api/infer_stream_chunk",
            files={"audio_chunk": ("chunk.wav", buffer.getvalue())},
            data={"session_id": session_id},
        )
        response.raise_for_status()
        result = response.json()
        frames += result["metadata"]["frame_count"]
        print(f"处理chunk {result['metadata']['chunk_index']}, 耗时: {result['metadata']['inference_time']:.3f}秒, "
              f"{result['metadata']['frame_count']} frames")
    print(f"{frames} frames in all")
finally:
    # 4. 关闭会话
    print(requests.delete(f"{URL}/api/infer_stream_close/{session_id}").json()["message"])
