"""Finding the expert workers: explicit ``--workers`` addresses, or the worker actors of a Ray cluster."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from expert_workers.source import ExpertSource, ExpertUnavailable, make_source

log = logging.getLogger(__name__)
WORKER_ACTOR_PREFIX = "expert-worker"


def ray_workers(address: str, deadline: float, prefix: str = WORKER_ACTOR_PREFIX,
                namespace: str | None = None) -> dict[str, Any]:
    """gRPC address -> actor handle of every expert worker actor (named ``prefix``*) in the Ray cluster at
    ``address``; waits until ``deadline`` for at least one, and for each to be ready."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING,
                 _node_ip_address=os.environ.get("RAY_NODE_IP_ADDRESS", "127.0.0.1"))
    while True:
        named = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(prefix) and namespace in (None, a["namespace"])]
        if named:
            handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]
            left = max(1.0, deadline - time.monotonic())
            # a deadline on the Ray calls too: an actor Ray cannot place (no expert_host left) never answers
            ray.get([h.ready.remote(left) for h in handles], timeout=left + 10)
            return dict(zip(ray.get([h.address.remote() for h in handles], timeout=30), handles))
        if time.monotonic() > deadline:
            raise TimeoutError(f"no expert worker actors named {prefix}* in the Ray cluster at {address}")
        time.sleep(1.0)


def connect(workers: Sequence[str] | None, ray_address: str | None, wait_s: float,
            ray_options: dict[str, Any] | None = None, **options: Any) -> ExpertSource:
    """An ExpertSource whose workers all answer, waiting up to ``wait_s`` for them to finish loading.
    ``options`` go to RemoteSource (timeout_s, prefer_zero_copy, metadata, credentials, ...)."""
    deadline = time.monotonic() + wait_s
    if workers:
        addresses = list(workers)
    else:
        actors = ray_workers(ray_address or "auto", deadline, **(ray_options or {}))
        addresses = sorted(actors)
        options = {**options, "actors": actors}  # zero-copy reads of Ray-storage workers
    if not addresses:
        raise ValueError("no expert worker addresses given")
    while True:
        try:
            source = make_source(workers=addresses, connect_timeout_s=max(1.0, deadline - time.monotonic()),
                                 **options)
        except ExpertUnavailable as e:
            raise TimeoutError(f"expert workers {addresses} not reachable within {wait_s:.0f}s: {e}") from e
        try:
            for key in source.layout().all_keys():  # every shard is loaded (RemoteSource caches manifests)
                source.manifest(key)
            return source
        except ExpertUnavailable as e:
            source.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert workers {addresses} not ready after {wait_s:.0f}s: {e}") from e
            log.info("waiting for expert workers: %s", e)
            time.sleep(1.0)
