"""The protocol's messages and service, built at import from the ``.proto``
files in ``protos/`` (restated from NVIDIA's published definitions; see
their headers). Compiling them here, rather than committing generated code,
keeps the generated classes in step with whichever protobuf runtime is
installed.

Loading these into a process that has also imported NVIDIA's own generated
modules (``nvidia_ace``, ``nvidia_audio2face_3d``) fails: both define the
same files in protobuf's one descriptor pool. Run their clients in another
process, as a client is anyway.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc

PROTO_ROOT = Path(__file__).resolve().parent / "protos"
SERVICE = "nvidia_ace.services.a2f_controller.v1.A2FControllerService"
DEFAULT_PORT = 52000  # Audio2Face-3D's own

_lock = threading.Lock()


def _load():
    with _lock:
        # grpc resolves .proto paths (and their imports) against sys.path.
        sys.path.insert(0, str(PROTO_ROOT))
        try:
            messages = grpc.protos("nvidia_audio2face_3d/messages.proto")
            _, services = grpc.protos_and_services("nvidia_audio2face_3d/audio2face.proto")
            return (
                messages,
                grpc.protos("nvidia_ace/animation.proto"),
                grpc.protos("nvidia_ace/audio.proto"),
                grpc.protos("nvidia_ace/status.proto"),
                services,
            )
        finally:
            sys.path.remove(str(PROTO_ROOT))


messages, animation, audio, status, services = _load()
