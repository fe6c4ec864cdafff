"""``ExpertWorkerActor``: the Ray actor shell around one ExpertStore and its gRPC server.

Everything of substance is in ``ExpertStore`` (store.py) and ``WorkerServer`` (server.py); the actor adds what Ray
is for: placement on nodes that offer the custom resource ``expert_host``, restarts (``max_restarts``), and the
Ray object store as the shared memory (``storage="ray"``: each expert a ``ray.put`` numpy array, zero-copy for
readers on the node, handed out by ``object_refs()``).

Typical use (deploy/)::

    actor = start_expert_worker("path/to/mixtral", shard="1/4", replica=0, bits=2)
    ray.get(actor.ready.remote())                 # blocks until loaded; raises if loading failed
    address = ray.get(actor.address.remote())     # "127.0.0.1:PORT", for RemoteSource / the coordinator

The actor runs threaded (``max_concurrency``) so ``address``/``info``/``stats`` answer while ``ready`` waits.
After a restart (the process died) Ray re-runs the constructor: the worker reloads its shard from the on-disk
cache, reports NOT_SERVING until ready, and (with ``port=0``) listens on a new port: ask ``address()`` again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

import ray

from expert_workers.format import ExpertKey, QuantSpec
from expert_workers.server import ServerConfig, WorkerServer
from expert_workers.store import ExpertHandle, ExpertStore, StoreInfo

log = logging.getLogger(__name__)

EXPERT_HOST_RESOURCE = "expert_host"
"""Custom Ray resource of nodes that may hold expert workers (``ray start --resources='{"expert_host": N}'``)."""
NODE_IP = "ray-node-ip"
"""``ServerConfig.host`` value that binds the address Ray knows the actor's node by, resolved on that node: the
one address both reachable from the other machines of the cluster and specific to this host."""


class ExpertWorkerActor:
    """One expert worker inside a Ray actor: an ExpertStore (loaded in a background thread) plus its gRPC server."""

    def __init__(self, model: str, shard: str = "0/1", bits: int = 2, group_size: int = 64, replica: int = 0,
                 cache_dir: str | None = None, storage: str = "ray", server: ServerConfig | None = None,
                 meta_bits: int = 16) -> None:
        """Binds the gRPC server at once (NOT_SERVING) and starts loading.

        model: checkpoint directory (as seen from the node) or an embedded model name.
        shard: ``"I/N"``; the actor owns experts with ``(layer * num_experts + expert) % N == I``.
        bits, group_size: hqq settings (bits 16 = unquantized). replica: which copy of the shard (reported only).
        meta_bits: 16, or 8 for scales and zeros as table codes (``QuantSpec.meta_bits``).
        cache_dir: quantized-expert cache directory on the node (default ``$MOE_CACHE_DIR/experts``).
        storage: ``"ray"`` (object store, ``object_refs()``) or ``"shm"`` (POSIX shm: zero-copy for plain
            RemoteSource readers on the node, no Ray needed on their side).
        server: gRPC options (host, port, threads, auth token file, TLS paths, test-only faults); default
            127.0.0.1, a free port. ``host=NODE_IP`` binds this node's Ray IP. Files are read here, on the
            actor's node. A non-loopback host without a token is refused (ValueError).
        """
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        server = server or ServerConfig()
        if server.host == NODE_IP:
            server = dataclasses.replace(server, host=ray.util.get_node_ip_address())
        spec = QuantSpec(bits=bits, group_size=group_size, meta_bits=meta_bits)
        self._store = ExpertStore(model, shard, spec, replica=replica,
                                  cache_dir=cache_dir, storage=storage, progress=False)
        self._server = WorkerServer(self._store, server)
        self._server.start()
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._load, name="expert-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self._server.config.fault.wait_before_load(self._stopping)  # test-only: hold NOT_SERVING
            self._store.load()
            self._server.set_serving(True)
            log.info("expert worker serving on %s", self._server.address)
        except BaseException as e:  # noqa: BLE001 - surfaced by ready()
            log.exception("loading shard %s failed", self._store.shard)
            self._error = e
        finally:
            self._loaded.set()

    def ready(self, timeout_s: float | None = None) -> bool:
        """Waits until the shard is loaded and served: True; False if ``timeout_s`` passed first. Re-raises the
        loading error (e.g. a bad checkpoint) if loading failed."""
        if not self._loaded.wait(timeout_s):
            return False
        if self._error is not None:
            raise RuntimeError(f"expert worker {self._store.shard} failed to load: {self._error}") from self._error
        return True

    def address(self) -> str:
        """``HOST:PORT`` of this worker's gRPC server (valid immediately, serving once ``ready``)."""
        return self._server.address

    def info(self) -> StoreInfo:
        """Identity, shard, settings, experts held, readiness (what GetInfo returns over gRPC)."""
        return self._store.info()

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex)."""
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def stats(self) -> dict[str, float]:
        """The store's counters (fetches, bytes_sent, load_seconds, quantized_experts, cache_reused, ...)."""
        return self._store.stats()

    def handle(self, key: ExpertKey) -> ExpertHandle:
        """The zero-copy handle of one expert (shm name + offset, or the Ray object id)."""
        return self._store.handle(key)

    def object_refs(self) -> dict[ExpertKey, Any]:
        """Every expert's ObjectRef (storage "ray"): ``ray.get(ref)`` on the same node is a zero-copy read-only
        numpy uint8 array. The refs stay valid while this actor lives (it owns the objects)."""
        self.ready()
        return {k: self._store.object_ref(k) for k in self._store.keys()}

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stops serving (in-flight RPCs get ``grace_s``), releases the shard's memory and exits the actor for
        good (no restart)."""
        self._stopping.set()
        self._server.stop(grace_s)
        self._store.close()
        ray.actor.exit_actor()


ExpertWorker = ray.remote(ExpertWorkerActor)
"""The Ray actor class; ``start_expert_worker`` sets its options."""


def start_expert_worker(model: str, shard: str = "0/1", *, bits: int = 2, group_size: int = 64, replica: int = 0,
                        cache_dir: str | None = None, storage: str = "ray", server: ServerConfig | None = None,
                        name: str | None = None, namespace: str | None = None, detached: bool = False,
                        max_restarts: int = -1, max_task_retries: int = 3, expert_host: float = 1.0,
                        num_cpus: float = 0.0, max_concurrency: int = 8, meta_bits: int = 16) -> Any:
    """Creates an ExpertWorkerActor placed on a node offering ``expert_host`` and returns its handle.

    max_restarts: -1 restarts the worker whenever its process dies (it reloads from the disk cache).
    max_task_retries: calls in flight when it died are retried this often after the restart.
    expert_host: how much of the custom resource one worker takes (1 = one worker per unit the node offers).
    num_cpus: CPUs reserved for it (0: it mostly copies memory and waits on sockets).
    name/namespace/detached: a named (optionally detached) actor, so deploy tools can find it again with
        ``ray.get_actor(name, namespace)`` and it outlives the driver that created it.
    server: must pickle: give the token and TLS as files (``auth_token_file``/``tls_cert``/``tls_key``, paths on
        the actor's node: the secret itself never travels through Ray), not as prebuilt
        ``credentials``/``interceptors``; the actor builds the credentials and the auth interceptor itself.
    """
    options: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": max_task_retries,
                               "resources": {EXPERT_HOST_RESOURCE: expert_host}, "num_cpus": num_cpus,
                               "max_concurrency": max_concurrency}
    if name is not None:
        options["name"] = name
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return ExpertWorker.options(**options).remote(model, shard, bits, group_size, replica, cache_dir, storage,
                                                  server, meta_bits)
