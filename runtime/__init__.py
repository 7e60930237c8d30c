"""What every process of the server needs, whichever side of it the process
is on (HTTP worker, engine, the main process that supervises both): the
typed settings, structured logs, and what a long-running process does with
its start-up objects.

It sits below both ``engine/`` and ``server/`` so that each can import it
without importing the other; it knows nothing of HTTP, sessions or models.
"""
