"""A Python client for the LAM-A2E server (every HTTP endpoint, REST and
WebSocket streaming) and the ``lam-a2e`` command line."""

from .client import Client, ServerError, Session
from .replay import ReplayError

__all__ = ["Client", "ReplayError", "ServerError", "Session"]
