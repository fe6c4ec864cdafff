"""``up`` / ``status`` / ``scale`` / ``down`` on a connected Ray cluster (see ``deploy.cluster.connect``).

A deployment is a set of named detached actors in one Ray namespace:

- ``expert-worker-g<G>-s<I>of<N>-r<R>``: ``expert_workers.actor.ExpertWorkerActor`` serving shard I/N (replica R)
  of generation G, on a node offering the ``expert_host`` resource (spread over such nodes);
- ``moe-coordinator``: ``deploy.coordinator_host.CoordinatorHost`` on the node ``deploy up`` ran on, running
  the coordinator process and holding the deployment's state.

``scale`` builds generation G+1 next to G (so new workers land where ``expert_host`` is free, e.g. on a node
that just joined), switches the coordinator over, then removes generation G.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deploy.cluster import ClusterError, node_label, nodes
from deploy.coordinator_host import CoordinatorHost
from deploy.spec import COORDINATOR_ACTOR, WORKER_PREFIX, DeployError, DeploySpec

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def _coordinator(namespace: str) -> Any:
    try:
        return ray.get_actor(COORDINATOR_ACTOR, namespace=namespace)
    except ValueError:
        raise DeployError(f"nothing deployed in namespace {namespace!r} (run `python -m deploy up`)") from None


def _named_actors(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and (a["name"].startswith(WORKER_PREFIX)
                                                      or a["name"] == COORDINATOR_ACTOR))


def _prepare_model(spec: DeploySpec, report: Report) -> None:
    """Builds an embedded model here first (with its progress bar), so workers on this node find it built."""
    from modelzoo import EMBEDDED, resolve_model

    if spec.model in EMBEDDED:
        report(f"preparing embedded model {spec.model} ...")
        resolve_model(spec.model)


def _start_workers(spec: DeploySpec, generation: int, report: Report) -> tuple[list[str], list[str]]:
    """Creates generation ``generation``'s N x R worker actors and waits until all serve; returns their names
    and addresses. On failure every actor it created is removed again."""
    from expert_workers.actor import EXPERT_HOST_RESOURCE, NODE_IP, ExpertWorker
    from expert_workers.server import ServerConfig

    # With a token the workers may bind an address other machines reach; each actor reads the files on its node.
    host = spec.worker_host or (NODE_IP if spec.auth_token_file else "127.0.0.1")
    server = ServerConfig(host=host, auth_token_file=spec.auth_token_file, tls_cert=spec.tls_cert,
                          tls_key=spec.tls_key)
    names, handles = [], []
    try:
        for shard, replica in spec.shards():
            name = spec.worker_name(generation, shard, replica)
            handles.append(ExpertWorker.options(
                name=name, namespace=spec.namespace, lifetime="detached", max_restarts=-1, max_task_retries=3,
                resources={EXPERT_HOST_RESOURCE: spec.expert_host}, num_cpus=0, max_concurrency=8,
                scheduling_strategy="SPREAD",
            ).remote(spec.model, f"{shard}/{spec.workers}", spec.expert_bits, spec.group_size, replica, None,
                     "shm", server, spec.meta_bits))
            names.append(name)
        _wait_ready(handles, spec.ready_timeout_s, report)
        return names, ray.get([h.address.remote() for h in handles])
    except BaseException:
        _kill(handles)
        raise


def _wait_ready(handles: list[Any], timeout_s: float, report: Report) -> None:
    from tqdm import tqdm

    pending = {h.ready.remote(): h for h in handles}
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(handles), desc="expert workers ready", unit="worker") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise DeployError(f"{len(pending)} expert workers not ready after {timeout_s:.0f}s (is there "
                                  "enough `expert_host` resource and memory? see `ray status` and the Ray logs)")
            for ref in done:
                pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker failed to load: surface its reason
                    raise DeployError(f"an expert worker failed: {e}") from e
                bar.update(1)


def _kill(handles: list[Any], grace_s: float = 5.0) -> None:
    """Stops workers gracefully (their shared memory is released), then makes sure they are gone."""
    refs = [h.shutdown.options(max_task_retries=0).remote(grace_s) for h in handles]  # exiting is no failure
    ray.wait(refs, num_returns=len(refs), timeout=grace_s + 10.0)
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _check_capacity(spec: DeploySpec, held: float = 0.0) -> bool:
    """True if the cluster has enough free ``expert_host`` for N x R new workers; False if only by first
    releasing ``held``; raises ClusterError if not even then."""
    need = spec.workers * spec.replicas * spec.expert_host
    free = float(ray.available_resources().get("expert_host", 0.0))
    if free + 1e-9 >= need:
        return True
    if free + held + 1e-9 >= need:
        return False
    raise ClusterError(f"{spec.workers} x {spec.replicas} workers need {need:g} `expert_host`, the cluster has "
                       f"{free + held:g} for them; add an expert host with `ray start --address=HEAD "
                       "--resources='{\"expert_host\": N}'`")


def _coordinator_device(spec: DeploySpec) -> str:
    if spec.device:
        return spec.device
    here = ray.get_runtime_context().get_node_id()
    return "cuda" if nodes().get(here, {}).get("gpus", 0) >= 1 else "cpu"


def up(spec: DeploySpec, report: Report = print) -> dict[str, Any]:
    """Places the workers, starts the coordinator, returns once it is SERVING (the coordinator's state)."""
    from client import Client

    if _named_actors(spec.namespace):
        raise DeployError(f"already deployed in namespace {spec.namespace!r}: use `scale` or `down` first")
    _check_capacity(spec)  # raises when the cluster cannot hold the workers (Ray would wait forever)
    _prepare_model(spec, report)
    device = _coordinator_device(spec)
    report(f"starting {spec.workers} x {spec.replicas} expert workers ({spec.expert_bits}-bit) ...")
    names, addresses = _start_workers(spec, 0, report)
    try:
        host = ray.remote(CoordinatorHost).options(
            name=COORDINATOR_ACTOR, namespace=spec.namespace, lifetime="detached", num_cpus=0,
            num_gpus=1 if device.startswith("cuda") else 0, max_concurrency=4, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(spec, device)
        report(f"starting the coordinator ({device}) ...")
        state = ray.get(host.start.remote(spec, 0, names, addresses, spec.ready_timeout_s))
        with Client(state["address"], timeout_s=10, tls_root_cert=spec.tls_root) as c:
            c.wait_ready(timeout_s=60)  # health: open without the token
    except BaseException:
        down(spec.namespace, report=lambda _: None)
        raise
    return state


def scale(namespace: str, workers: int, replicas: int | None = None, report: Report = print) -> dict[str, Any]:
    """Re-shards onto ``workers`` shards (x ``replicas``): new actors first, the coordinator switches, the old
    actors go. Without room for both generations, the old workers are removed first (requests meanwhile fail
    with UNAVAILABLE)."""
    host = _coordinator(namespace)
    state = ray.get(host.state.remote())
    spec = DeploySpec(**state["spec"]).with_(workers=workers, replicas=replicas or state["spec"]["replicas"])
    old = [ray.get_actor(n, namespace=namespace) for n in state["worker_names"]]
    generation = state["generation"] + 1
    seamless = _check_capacity(spec, held=len(old) * spec.expert_host)
    if not seamless:
        report("not enough free expert_host for both generations: replacing the workers in place")
        _kill(old)
    report(f"starting {spec.workers} x {spec.replicas} expert workers (generation {generation}) ...")
    names, addresses = _start_workers(spec, generation, report)
    report("switching the coordinator to them ...")
    try:
        state = ray.get(host.start.remote(spec, generation, names, addresses, spec.ready_timeout_s))
    except BaseException:
        _kill([ray.get_actor(n, namespace=namespace) for n in names])
        raise
    if seamless:
        report(f"removing {len(old)} workers of generation {generation - 1} ...")
        _kill(old)
    return state


def down(namespace: str, report: Report = print) -> list[str]:
    """Stops the coordinator and removes every actor of the deployment; returns their names."""
    removed = _named_actors(namespace)
    if COORDINATOR_ACTOR in removed:
        host = ray.get_actor(COORDINATOR_ACTOR, namespace=namespace)
        try:
            ray.get(host.stop.remote(30.0), timeout=60)
        except Exception as e:  # noqa: BLE001 - kill it anyway
            report(f"coordinator did not stop cleanly: {e}")
        ray.kill(host, no_restart=True)
    _kill([ray.get_actor(n, namespace=namespace) for n in removed if n != COORDINATOR_ACTOR])
    return removed


def _worker_row(name: str, namespace: str, known: dict[str, dict[str, Any]],
                tls_root: str | None = None) -> dict[str, Any]:
    from client import Client, ClientError

    row: dict[str, Any] = {"name": name, "node": "?", "pid": None, "address": None, "shards": "?",
                           "replica": None, "health": "DEAD", "bytes": 0}
    try:
        h = ray.get_actor(name, namespace=namespace)
        info, node_id, address = ray.get([h.info.remote(), h.node_id.remote(), h.address.remote()], timeout=10)
    except Exception:  # noqa: BLE001 - dead, restarting or unreachable: reported as such
        return row
    row.update(node=node_label(node_id, known), pid=info.pid, address=address, shards=str(info.shard),
               replica=info.replica, bytes=int(info.bytes_held))
    try:
        with Client(address, timeout_s=5, tls_root_cert=tls_root) as c:
            row["health"] = c.health()
    except ClientError as e:
        row["health"] = e.code
    return row


def status(namespace: str) -> dict[str, Any]:
    """``{"coordinator": {...}, "workers": [{name, node, pid, address, shards, replica, health, bytes}]}``."""
    from client import Client, ClientError

    try:
        state = ray.get(_coordinator(namespace).state.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise DeployError(f"the coordinator actor does not answer ({type(e).__name__}); "
                          "`python -m deploy down` removes what is left") from None
    known = nodes()
    spec = state["spec"]
    coord: dict[str, Any] = {"name": COORDINATOR_ACTOR, "node": node_label(state["node_id"], known),
                             "pid": state["pid"], "address": state["address"], "health": "DEAD",
                             "model": spec["model"], "device": state["device"], "workers": spec["workers"],
                             "replicas": spec["replicas"], "expert_bits": spec["expert_bits"],
                             "meta_bits": spec.get("meta_bits", 16),
                             "attn_bits": spec["attn_bits"], "generation": state["generation"],
                             "restarts": state["restarts"], "auth": bool(spec.get("auth_token_file")),
                             "tls": bool(spec.get("tls_cert"))}
    if state["address"] and state["running"]:
        try:
            with Client(state["address"], timeout_s=5, tls_root_cert=spec.get("tls_root")) as c:
                coord["health"] = c.health()
        except ClientError as e:
            coord["health"] = e.code
    workers = [_worker_row(n, namespace, known, spec.get("tls_root")) for n in state["worker_names"]]
    return {"coordinator": coord, "workers": workers}
