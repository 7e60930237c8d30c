"""Just enough of the Chrome DevTools protocol to drive a page in headless
Chromium from a test: start the browser, evaluate JavaScript (awaiting
promises), resize the viewport, take screenshots. Speaks CDP over the
``websockets`` client the project already has, so no browser-automation
package is needed."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

# As the machine's probe runs it: no background networking (this machine's
# network is closed), a fresh profile, microphone and autoplay allowed, a fake
# microphone (a tone) instead of a device.
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream", "--window-size=1280,1100",
]  # fmt: skip


class BrowserError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    def __init__(self) -> None:
        from websockets.sync.client import connect

        if CHROMIUM is None:
            raise BrowserError("no chromium on PATH")
        self.profile = tempfile.mkdtemp(prefix="a2e-chromium-")
        port = _free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = None
        deadline = time.time() + 30
        while url is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    url = next((t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page"), None)
            except OSError:
                time.sleep(0.2)
        if url is None:
            self.close()
            raise BrowserError("chromium did not open its DevTools port")
        self._connection = connect(url, max_size=None, open_timeout=10)
        self.ws = self._connection.__enter__()
        self.next_id = 0
        self.console: list[str] = []
        self.call("Runtime.enable")

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            message = json.loads(self.ws.recv(max(0.1, deadline - time.time())))
            if message.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(message["params"]["exceptionDetails"])[:500])
            if message.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in message["params"]["args"]))
            if message.get("id") == mine:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of ``expression`` (promises awaited); a thrown error raises."""
        result = self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise BrowserError(f"timed out waiting for {expression}; console: {self.console[-5:]}")

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            if hasattr(self, "_connection"):
                self._connection.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
