"""The document's batch example: every sound file of a folder, one JSON each."""

import json
import sys
from pathlib import Path

import requests

from _common import SAMPLE, URL

audio_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE.parent
output_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("results")
output_dir.mkdir(exist_ok=True)

for audio_file in sorted(p for p in audio_dir.iterdir() if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg")):
    print(f"处理: {audio_file.name}")
    with open(audio_file, "rb") as audio:
        response = requests.post(f"{URL}/api/infer", files={"audio_file": audio}, data={"movement_smooth": True})
    if response.status_code != 200:
        print(f"  skipped: {response.status_code} {response.json().get('detail')}")
        continue
    output_file = output_dir / f"{audio_file.stem}.json"
    with open(output_file, "w") as f:
        json.dump(response.json(), f)
    print(f"  {response.json()['metadata']['frame_count']} frames -> {output_file}")
