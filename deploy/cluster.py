"""Connecting ``deploy`` to a running Ray cluster, bound to loopback when the cluster is.

Ray decides at import time whether to resolve 127.0.0.1 to the machine's external address
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), so ``prepare_loopback_env`` runs before anything imports ``ray``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any


class ClusterError(RuntimeError):
    """No Ray cluster at the address, or it cannot host the deployment."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _recorded_address() -> str | None:
    """The address the latest local ``ray start`` recorded (what ``address="auto"`` reads), if any."""
    tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def prepare_loopback_env(address: str | None) -> None:
    """Sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (unless set) when the cluster is on loopback, so this
    driver joins it as 127.0.0.1 instead of the external interface. Call before importing ``ray``."""
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target == "auto":
        target = _recorded_address() or ""
    host = target.removeprefix("ray://").rsplit(":", 1)[0]
    if host and _is_loopback(host):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast when nothing listens at the GCS address (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"no Ray cluster at {address} ({e}); start one with `ray start --head` or "
                           "`ray up deploy/cluster.yaml`, or pass --address / set RAY_ADDRESS") from None


def resolve_address(address: str | None) -> str:
    """``HOST:PORT`` of the cluster: ``address``, else ``$RAY_ADDRESS``, else the latest local ``ray start``."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address != "auto":
        return address.removeprefix("ray://") if address.startswith("ray://") else address
    try:
        from ray._private.services import canonicalize_bootstrap_address  # Ray's own "auto" lookup

        found = canonicalize_bootstrap_address("auto")
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError or others when nothing is found
        raise ClusterError(f"no running Ray cluster found ({e}); start one with `ray start --head` or "
                           "`ray up deploy/cluster.yaml`, or pass --address / set RAY_ADDRESS") from None
    if not found:
        raise ClusterError("no running Ray cluster found: pass --address HOST:PORT or set RAY_ADDRESS")
    return found


def connect(address: str | None, namespace: str) -> str:
    """Joins the cluster as a driver in ``namespace`` and returns its address.

    A loopback cluster is joined as 127.0.0.1 (with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see
    ``prepare_loopback_env``; without both Ray reports the external interface). Ray's token authentication is used when a token is available (Ray only
    does that by itself for ``address="auto"``)."""
    import ray

    prepare_loopback_env(address)
    resolved = resolve_address(address)
    _check_reachable(resolved)
    host = resolved.rsplit(":", 1)[0]
    if "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # a Ray without token authentication
            pass
    kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": False, "logging_level": logging.WARNING}
    if _is_loopback(host):
        kwargs["_node_ip_address"] = "127.0.0.1"
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=resolved, **kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {resolved}: {e}") from None
    return resolved


def nodes() -> dict[str, dict[str, Any]]:
    """Alive nodes by node id: ``ip``, ``hostname``, ``expert_host`` capacity, ``gpus``."""
    import ray

    out: dict[str, dict[str, Any]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        out[node["NodeID"]] = {"ip": node.get("NodeManagerAddress", "?"),
                               "hostname": node.get("NodeManagerHostname", "?"),
                               "expert_host": res.get("expert_host", 0.0), "gpus": res.get("GPU", 0.0)}
    return out


def node_label(node_id: str | None, known: dict[str, dict[str, Any]]) -> str:
    """``IP/short-id`` of a node (two Ray nodes on one machine share the IP)."""
    if not node_id:
        return "?"
    info = known.get(node_id)
    return f"{info['ip']}/{node_id[:8]}" if info else node_id[:8]


def expert_host_capacity() -> float:
    """Total ``expert_host`` resource of the cluster."""
    import ray

    return float(ray.cluster_resources().get("expert_host", 0.0))
