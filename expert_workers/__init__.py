"""Expert workers: one shard of a Mixtral model's experts, hqq-quantized, in shared CPU RAM, served over gRPC.

- ``checkpoint.Checkpoint``: reads one expert at a time from a Hugging Face Mixtral directory (both layouts).
- ``store.ExpertStore``: quantize (or reload the disk cache), hold in POSIX shm / the Ray object store.
- ``server.WorkerServer`` + ``service``/``wire``: the gRPC service and health; ``python -m expert_workers serve``.
- ``actor.ExpertWorkerActor`` / ``start_expert_worker``: the Ray actor shell.
- ``source.ExpertSource`` and ``make_source``: what the coordinator uses; ``inprocess.InProcessSource`` and
  ``fetch.RemoteSource`` (gRPC + zero-copy shm, checksums, replica failover) implement it.
"""
