"""The document's standard and offline examples: animate a whole file, save the JSON."""

import json
import sys

import requests

from _common import SAMPLE, URL

audio_path = sys.argv[1] if len(sys.argv) > 1 else SAMPLE
out_path = sys.argv[2] if len(sys.argv) > 2 else "animation.json"

with open(audio_path, "rb") as audio:
    response = requests.post(
        f"{URL}/api/infer",
        files={"audio_file": audio},
        data={"id_idx": 0, "ex_vol": False, "movement_smooth": True, "brow_movement": True},
    )
response.raise_for_status()
result = response.json()
print(f"生成了 {result['metadata']['frame_count']} 帧动画")
print(f"推理耗时: {result['metadata']['inference_time']:.2f} 秒")

with open(out_path, "w") as f:
    json.dump(result, f)
print(f"saved to {out_path}")
