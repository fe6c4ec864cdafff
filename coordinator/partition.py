"""How many cache slots each layer gets: planned from the traffic, not spread evenly.

Layers do not route alike. In a random-weight Mixtral the residual stream drifts towards one direction, so the
deep layers keep choosing the same two or three experts and hit at any k, while the first layers spread their
tokens over all eight and miss (bench/results/2026-11-30-h200-s7a: at 8 GB nearly every copy of a token lands
in its first dozen layers). Real models differ by layer too (code-moe-22m's layer 0 hardly uses some experts).
An even spread then spends slots where they buy nothing.

``SlotPlanner`` is utility-based cache partitioning (Qureshi & Patt, MICRO 2006) with one partition per layer:

- each layer keeps a *shadow* LRU stack of all its experts and counts, per stack depth d, the decode uses that
  found their expert at depth d (``observe``). A layer with s slots hits exactly the uses of depth < s, so the
  counts give every layer's hits for every size at once;
- ``plan`` gives each layer ``floor`` slots (a token's top-k must fit), then hands out the rest where the
  counts promise the most hits per slot, looking ahead over several slots at once because a layer's curve
  need not be concave (UCP's "lookahead" allocation);
- counts decay by half at each plan, so the partition follows the traffic as it drifts.

``ExpertCache.repartition`` then moves buffers between layers, evicting what the eviction policy picks in
the layers that shrink. On code-moe-22m's held-out trace (mean k = 4 / 5) it lifts the LRU hit rate from
0.861 / 0.926 to 0.877 / 0.948. The counts model LRU; with LRFU eviction (the default) the plan still helps:
0.880 → 0.893 at mean k = 4 (tests/test_cache.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DECAY = 0.5
"""Weight of the counts older than the last plan: one half, so about two plans' traffic drive each plan."""


class SlotPlanner:
    """Per-layer stack-depth counts of decode traffic, and the slot partition they favour."""

    def __init__(self, layers: int, experts: int, floor: int) -> None:
        if not 1 <= floor <= experts:
            raise ValueError(f"floor must be in [1, {experts}], got {floor}")
        self.layers, self.experts, self.floor = layers, experts, floor
        self._stacks = [list(range(experts)) for _ in range(layers)]  # most recently used first
        self._depth_uses = np.zeros((layers, experts))

    def observe(self, layer: int, used: Iterable[int]) -> None:
        """One decode step's experts of ``layer`` (looked up together, as the cache does)."""
        stack = self._stacks[layer]
        used = list(used)
        for e in used:
            self._depth_uses[layer, stack.index(e)] += 1
        for e in used:  # then all of them most recently used
            stack.remove(e)
        stack[:0] = used

    def hits(self, slots: Sequence[int]) -> float:
        """Decode uses (decayed) that LRUs of ``slots`` per layer would have hit."""
        return float(sum(self._depth_uses[layer, :n].sum() for layer, n in enumerate(slots)))

    def plan(self, total: int) -> list[int]:
        """Slots per layer summing to ``total`` (at most ``experts`` each; ``floor`` at least), most hits
        first; then the counts decay."""
        if not self.layers * self.floor <= total <= self.layers * self.experts:
            raise ValueError(f"{total} slots cannot give {self.layers} layers between {self.floor} and "
                             f"{self.experts} each")
        alloc = np.full(self.layers, self.floor)
        cum = np.concatenate([np.zeros((self.layers, 1)), np.cumsum(self._depth_uses, axis=1)], axis=1)
        width = np.arange(1, self.experts + 1)
        left = total - int(alloc.sum())
        while left > 0:
            # gain per slot of growing layer l by j slots: (hits at size alloc+j − hits at alloc) / j
            ends = np.minimum(alloc[:, None] + width[None, :], self.experts)
            gain = (cum[np.arange(self.layers)[:, None], ends] - cum[np.arange(self.layers), alloc][:, None]) / width
            gain[(alloc[:, None] + width[None, :] > self.experts) | (width[None, :] > left)] = -1.0
            layer, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
            if gain[layer, j] <= 0:
                break  # no layer would hit more: the rest is spread evenly below
            alloc[layer] += j + 1
            left -= j + 1
        for _ in range(left):  # slots no traffic asks for: to the smallest layers with room, shallowest first
            room = np.flatnonzero(alloc < self.experts)
            alloc[room[np.argmin(alloc[room])]] += 1
        self._depth_uses *= DECAY
        return alloc.tolist()
