"""The coordinator: transformers' Mixtral with its experts served from a hot device cache that fetches from the
expert workers and prefetches the next layer's likely experts.

    from coordinator import Coordinator, CoordinatorConfig, GenerateParams
    engine = Coordinator(ckpt_dir, make_source(workers=[...]), CoordinatorConfig(device="cuda"))
    events = engine.generate(GenerateParams(prompt="def f(", max_new_tokens=16))

Modules: ``model`` (the shell), ``moe`` (experts implementation, ``expert_ffn``, prefetch), ``cache``
(ExpertCache), ``transfer`` (staging, streams, events), ``generate`` (requests, sampling, detokenization),
``engine`` (Coordinator), ``scheduler``, ``service``/``wire``/``server`` (gRPC), ``__main__`` (CLI).
"""

from coordinator.cache import ExpertCache
from coordinator.config import EXACT, CoordinatorConfig
from coordinator.engine import Coordinator
from coordinator.generate import GenerateParams, InvalidRequest, QueueFull, RequestCancelled, TokenEvent
from coordinator.moe import expert_ffn

__all__ = ["EXACT", "Coordinator", "CoordinatorConfig", "ExpertCache", "GenerateParams", "InvalidRequest",
           "QueueFull", "RequestCancelled", "TokenEvent", "expert_ffn"]
