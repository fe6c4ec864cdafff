"""The Ray actor shell on a real local Ray bound to 127.0.0.1: placement by the ``expert_host`` resource, Ray
object-store storage read zero-copy, shm storage, and restart after the process dies (reload from the disk cache)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from expert_workers.fetch import RemoteSource
from expert_workers.format import INT2_M8, ExpertKey

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def _fetch_all(source: RemoteSource) -> dict[ExpertKey, bytes]:
    out = torch.empty(1 << 16, dtype=torch.uint8)
    return {k: bytes(out[:source.fetch_into(k, out).nbytes].numpy()) for k in source.layout().all_keys()}


def test_actors_serve_from_the_object_store_and_restart(local_ray: None, tiny_ckpt: Path) -> None:
    from expert_workers.actor import start_expert_worker

    actors = [start_expert_worker(str(tiny_ckpt), f"{i}/2", max_restarts=1) for i in range(2)]
    assert ray.get([a.ready.remote() for a in actors], timeout=240) == [True, True]
    addresses = ray.get([a.address.remote() for a in actors])
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    infos = ray.get([a.info.remote() for a in actors])
    assert [i.storage for i in infos] == ["ray", "ray"] and all(i.ready for i in infos)
    assert sorted(k for i in infos for k in i.experts) == [ExpertKey(la, e) for la in range(4) for e in range(8)]

    # A third worker finds no expert_host left (the node offers 2): Ray keeps it pending.
    pending = start_expert_worker(str(tiny_ckpt), "0/2")
    assert ray.wait([pending.ready.remote()], timeout=3)[0] == []
    ray.kill(pending)

    with RemoteSource(addresses, prefer_zero_copy=False) as streamed:
        reference = _fetch_all(streamed)
    with RemoteSource(addresses, actors=dict(zip(addresses, actors))) as local:
        for key, data in reference.items():
            view = local.host_view(key)
            assert view is not None and bytes(view.numpy()) == data, key
        assert _fetch_all(local) == reference
        st = local.stats()
        assert st["zero_copy_reads"] == 32 and st["grpc_fetches"] == 0 and st["checksum_failures"] == 0
    refs = ray.get(actors[0].object_refs.remote())
    assert bytes(ray.get(refs[ExpertKey(0, 0)])) == reference[ExpertKey(0, 0)]

    # The process dies: Ray restarts the actor, which reloads its shard from the disk cache.
    pid = ray.get(actors[1].pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if ray.get(actors[1].pid.remote(), timeout=30) != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "actor was not restarted"
        time.sleep(0.5)
    assert ray.get(actors[1].ready.remote(), timeout=120)
    stats = ray.get(actors[1].stats.remote())
    assert stats["cache_reused"] == 1 and stats["quantized_experts"] == 0
    addresses[1] = ray.get(actors[1].address.remote())
    with RemoteSource(addresses, prefer_zero_copy=False) as streamed:
        assert _fetch_all(streamed) == reference
    for a in actors:
        ray.kill(a)


def test_actor_with_shm_storage_is_read_zero_copy_without_ray(local_ray: None, tiny_ckpt: Path) -> None:
    from expert_workers.actor import start_expert_worker

    actor = start_expert_worker(str(tiny_ckpt), "0/1", bits=2, meta_bits=8, storage="shm", max_restarts=0)
    assert ray.get(actor.ready.remote(), timeout=240)
    assert ray.get(actor.info.remote()).spec == INT2_M8     # 8-bit scale/zero tables, quantized in the actor
    address = ray.get(actor.address.remote())
    handle = ray.get(actor.handle.remote(ExpertKey(3, 7)))
    assert handle.shm_name and Path("/dev/shm", handle.shm_name).exists()
    with RemoteSource([address]) as source:
        view = source.host_view(ExpertKey(3, 7))
        assert view is not None and view.numel() == handle.length
        assert source.manifest(ExpertKey(3, 7)).matrices["w1"].meta_bits == 8
        assert source.stats()["zero_copy_reads"] == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.shutdown.remote(), timeout=60)  # exits the actor for good
    assert not Path("/dev/shm", handle.shm_name).exists()
