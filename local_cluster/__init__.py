"""A whole cluster on one machine, from its own binaries and without Docker:
Redis (one server, a primary with a replica and three sentinels, or a
Redis Cluster of three shards), server nodes and HAProxy in front, all on
loopback ports (``lam-a2e cluster up``). The tests and the benchmarks start
their clusters through it, so what they measure is what an operator runs.

It owns starting, watching and stopping those processes; it knows nothing
of what the server does with them.
"""
