"""The document's close example, with a session that exists (its placeholder id does not)."""

import sys

import requests

from _common import URL

session_id = sys.argv[1] if len(sys.argv) > 1 else None
if session_id is None:
    session_id = requests.post(f"{URL}/api/infer_stream_init", json={"id_idx": 0}).json()["session_id"]

response = requests.delete(f"{URL}/api/infer_stream_close/{session_id}")
print(response.status_code, response.json().get("message") or response.json().get("detail"))
