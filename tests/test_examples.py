"""examples/: the API document's examples, corrected, run as a user would
against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_end_to_end import free_port, start, stop

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def url():
    port = free_port()
    proc = start(["app.py", "--model", "a2e-lite"], port, dict(os.environ, A2E_LOG_LEVEL="warning"))
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def run(url, tmp_path, name, *args):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, LAM_A2E_URL=url))  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_infer_file(url, tmp_path):
    assert "生成了 240 帧动画" in run(url, tmp_path, "infer_file.py")
    assert json.loads((tmp_path / "animation.json").read_text())["metadata"]["frame_count"] == 240


def test_stream_file_with_a_short_last_chunk(url, tmp_path):
    out = run(url, tmp_path, "stream_file.py")  # 8.0 s: seven 1 s chunks and a 0.995 s one
    assert "处理chunk 8" in out and "240 frames in all" in out and "Session closed" in out
    assert not list(tmp_path.glob("temp_chunk_*"))


def test_microphone_with_a_file_for_the_microphone(url, tmp_path):
    out = run(url, tmp_path, "microphone.py", "--seconds", "2")
    assert "  2.0 s: 30 frames" in out


def test_batch(url, tmp_path):
    out = run(url, tmp_path, "batch.py", str(ROOT / "server" / "demo" / "samples"), "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chinese.json", "english.json", "japanese.json"]
    assert "处理: english.flac" in out


def test_close_session(url, tmp_path):
    assert run(url, tmp_path, "close_session.py").startswith("200 Session closed")
    assert run(url, tmp_path, "close_session.py", "a1b2c3d4-e5f6-7890-abcd-ef1234567890").startswith("404 Session not found")
