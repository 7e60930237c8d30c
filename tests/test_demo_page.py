"""The demo page (GET /demo) in real headless Chromium against a real server:
a shipped clip animated whole, the face's drawn mouth following jawOpen,
live streaming from a file and from the (fake) microphone over the
WebSocket, a phone-sized layout; all behind ``--api-key``. Screenshots go to benchmarks/out/demo/.

Needs Chromium (Debian's ``chromium``; ``.ci/run`` installs it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.headless_chromium import CHROMIUM, Chromium
from tests.test_end_to_end import free_port, start, stop

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "benchmarks" / "out" / "demo"


@pytest.fixture(scope="module")
def page():
    port = free_port()
    # Behind --api-key: the page sends it as a header for whole files and as a
    # WebSocket subprotocol for live streams (a browser cannot set headers there).
    proc = start(["app.py", "--model", "a2e-lite", "--api-key", "demo-key"], port, dict(os.environ, A2E_LOG_LEVEL="warning"))
    browser = Chromium()
    try:
        browser.navigate(f"http://127.0.0.1:{port}/demo")
        browser.wait_for("window.demo && document.getElementById('model-info').textContent.includes('a2e-lite')")
        browser.evaluate("document.getElementById('api-key').value = 'demo-key'")
        yield browser, f"http://127.0.0.1:{port}"
    finally:
        browser.close()
        stop(proc)


def test_the_page_and_its_files_are_served_without_third_party_code(page):
    _, http = page
    html = requests.get(http + "/demo").text
    assert "<script type=\"module\" src=\"/demo/demo.js\">" in html
    for name in ("demo.js", "face.js", "charts.js", "demo.css", "samples/english.flac"):
        assert requests.get(f"{http}/demo/{name}").status_code == 200
    code = "".join(requests.get(f"{http}/demo/{n}").text for n in ("index.html", "demo.js", "face.js", "charts.js", "demo.css"))
    assert set(re.findall(r"https?://[^\s\"'`]+", code)) <= {"http://www.w3.org/2000/svg"}  # a namespace, never fetched
    key = {"X-API-Key": "demo-key"}
    assert requests.get(http + "/demo/../app.py", headers=key).status_code == 404
    assert requests.get(http + "/demo/nothing.js", headers=key).status_code == 404


def test_a_shipped_clip_animates_and_the_mouth_follows_jaw_open(page):
    browser, _ = page
    browser.evaluate("document.getElementById('seed').value = '3'; window.demo.animateFile()")
    assert browser.evaluate("window.demo.state.frames.length") == 240  # 8.0 s of English
    assert browser.evaluate("window.demo.state.names.length") == 52
    assert browser.evaluate("window.demo.state.error") is None
    jaw, drawn, box = [], [], []
    for t in np.arange(0.0, 7.95, 0.1):
        got = browser.evaluate(f"window.demo.seek({t:.2f})")
        jaw.append(browser.evaluate(f"window.demo.state.frames[{got['frame']}][window.demo.state.index.jawOpen]"))
        drawn.append(got["mouthOpening"])
        box.append(got["mouthBoxHeight"])  # the SVG's own measure of the drawn mouth
    jaw, drawn, box = map(np.array, (jaw, drawn, box))
    assert jaw.max() - jaw.min() > 0.1  # the clip moves the jaw
    assert np.corrcoef(jaw, box)[0, 1] > 0.85
    assert np.corrcoef(jaw, drawn)[0, 1] > 0.85
    assert box[jaw.argmax()] > box[jaw.argmin()] + 10  # visibly open against visibly closed
    browser.evaluate("window.demo.seek(%f)" % (jaw.argmax() / 10))
    browser.screenshot(SHOTS / "whole_file.png")
    # Every export format of the server's, for the animation on the page (its seed is kept).
    csv_text = browser.evaluate("window.demo.exportBlob('csv').then((b) => b.text())")
    lines = csv_text.splitlines()
    assert lines[0].startswith("Timecode,BlendShapeCount,EyeBlinkLeft") and len(lines) == 241
    jaw_column = lines[0].split(",").index("JawOpen")
    page_jaw = browser.evaluate("window.demo.state.frames.map((f) => f[window.demo.state.index.jawOpen])")
    assert np.allclose([float(line.split(",")[jaw_column]) for line in lines[1:]], page_jaw, atol=1e-6)
    sizes = browser.evaluate(
        "Promise.all(['json', 'json_named', 'gltf', 'ndjson'].map((f) => window.demo.exportBlob(f).then((b) => [f, b.size, b.type])))"
    )
    assert all(size > 10_000 for _, size, _ in sizes)
    assert dict((f, t) for f, _, t in sizes)["gltf"] == "model/gltf-binary"
    # Playing: the drawn frame follows the audio clock.
    browser.evaluate("document.getElementById('audio').currentTime = 0; document.getElementById('audio').play()")
    browser.wait_for("document.getElementById('audio').currentTime > 0.5 && window.demo.state.current > 10", timeout=15)
    browser.evaluate("document.getElementById('audio').pause()")


@pytest.mark.parametrize("kind", ["file", "mic"])
def test_live_streaming_over_the_websocket(page, kind):
    browser, _ = page
    browser.evaluate("document.getElementById('sample').value = 'chinese.flac'; document.getElementById('hop').value = '0.25'")
    browser.evaluate(f"window.demo.startLive('{kind}')")
    browser.wait_for("window.demo.state.frames.filter(Boolean).length >= 20", timeout=20)
    browser.screenshot(SHOTS / f"live_{kind}.png")
    browser.evaluate("window.demo.stopLive()")
    state = browser.evaluate(
        "(() => { const s = window.demo.state; return {mode: s.mode, frames: s.frames.filter(Boolean).length,"
        " holes: s.frames.length - s.frames.filter(Boolean).length, latencies: s.latencies, error: s.error,"
        " saved: s.result && s.result.frames.length}; })()"
    )
    assert state["error"] is None and state["mode"] == "idle"
    assert state["frames"] >= 20 and state["holes"] == 0  # every frame from 0 on, once
    assert len(state["latencies"]) == state["saved"] == state["frames"]
    assert all(np.isfinite(state["latencies"]))
    assert "latency: last" in browser.evaluate("document.getElementById('latency').textContent")


def test_a_phone_sized_screen(page):
    browser, _ = page
    browser.viewport(390, 844, mobile=True)
    try:
        assert browser.evaluate("document.documentElement.scrollWidth") <= 390
        face = browser.evaluate("JSON.stringify(document.getElementById('face').getBoundingClientRect())")
        assert '"width":' in face and browser.evaluate("document.getElementById('face').getBoundingClientRect().width") <= 390
        browser.screenshot(SHOTS / "phone.png")
    finally:
        browser.viewport(1280, 1100)
