"""Device engines in processes of their own, and how HTTP workers reach them.

* ``transport``: messages and shared-memory rings between a worker and an engine.
* ``process``: an engine process: one device's InferenceService behind a Unix socket.
* ``client``: the worker side: one link per engine, placement, the Engine interface.
* ``supervisor``: the main process: starts engines and restarts what dies.
"""
