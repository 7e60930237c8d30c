"""A Python client for the LAM-A2E server (every HTTP endpoint, REST and
WebSocket streaming) and the ``lam-a2e`` command line."""

from .client import Client, ServerError, Session

__all__ = ["Client", "ServerError", "Session"]
