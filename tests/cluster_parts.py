"""The real parts of a cluster for the tests (``local_cluster``, what
``lam-a2e cluster up`` starts): redis-server, redis-sentinel, redis-cli and
haproxy (Debian's packages; .ci/run installs them) and server nodes.

Where a part is not installed, the tests that need it are skipped saying
so, except in CI (``A2E_REQUIRE_CLUSTER_TOOLS=1``, set by .ci/run), where a
missing part is a failure: a skipped cluster test must not pass for one run.
"""

from __future__ import annotations

import os

import pytest

from local_cluster import processes
from local_cluster.cluster import Cluster
from local_cluster.nodes import HAProxy, Node
from local_cluster.processes import free_port, kill_tree, require, wait_for_port
from local_cluster.redis_parts import RedisCluster, RedisServer, Sentinels

__all__ = ["Cluster", "HAProxy", "Node", "RedisCluster", "RedisServer", "Sentinels", "free_port", "kill_tree", "require",
           "wait_for_port"]  # fmt: skip


def _skip_or_fail(why: str) -> None:
    if os.environ.get("A2E_REQUIRE_CLUSTER_TOOLS"):
        pytest.fail(why)
    pytest.skip(why)


processes.on_missing = _skip_or_fail
