"""What the examples share: where the server is and the default clip."""

import os
from pathlib import Path

URL = os.environ.get("LAM_A2E_URL", "http://localhost:8000").rstrip("/")
SAMPLE = Path(__file__).resolve().parent.parent / "server" / "demo" / "samples" / "english.flac"
