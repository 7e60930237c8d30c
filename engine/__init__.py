"""Everything that runs on one device: how a chunk becomes frames there.

* ``protocol``: the ``Engine`` interface, its answers and errors (what front doors and engines exchange).
* ``service``: the inference service of one device, composed of:
  ``loading`` (which model, and the limits its speed allows), ``clips``
  (whole clips and vocal isolation), ``streams`` (streaming sessions and
  their chunk queue, over the ``sessions`` store) and ``handback`` (a
  finished batch back from the batcher thread, post-processed and answered).
* ``metrics``: what an engine serves, for Prometheus.
* ``process``: an engine process: one device's service behind a Unix socket.
* ``transport``: messages and shared-memory rings between a worker and an engine.
* ``client``: the worker side: one link per engine process, and placement.
* ``session_ids``: session ids that name the engine that made them.
* ``supervisor``: the main process's part: starts engines and restarts what dies.

Nothing here imports ``server/``: the front doors import this.
"""
