"""Would the router's whole distribution make a better eviction worth than LRFU's one-per-use? (NOTES item 79)

LRFU (``coordinator.cache``) adds 1 to an expert's worth each time a token uses it, and admission lets a miss
in only when its worth beats the victim's. The router also scores the six experts a token does not use: a
"soft" worth adds ``alpha`` times each expert's router probability at every step, so an expert the router
nearly chose counts for something. Replayed on code-moe-22m (learned routing), teacher-forced on Python
source, one per-layer cache per sequence, a token's experts looked up together, as its README measures.

    python -m bench.soft_worth --out bench/results/2026-12-07-cpu-soft-worth.md
"""
from __future__ import annotations

import argparse
import glob
import itertools
import random
from pathlib import Path

import numpy as np
import torch

from bench.cache_bound import emit
from coordinator.cache import LRFU_DECAY

CODE_MOE = Path(__file__).resolve().parents[2] / "shared" / "models" / "code-moe-22m"


def router_trace(sequences: int, tokens: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Router probabilities [L, S, T, E] and top-2 ids [L, S, T, 2] of code-moe-22m over the first ``tokens``
    tokens of ``sequences`` numpy source files (shuffled with seed 0; the model never saw its own held-out set
    here, only code like its training data)."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(CODE_MOE)
    model = MixtralForCausalLM.from_pretrained(CODE_MOE, dtype=torch.float32).eval()
    files = sorted(glob.glob(str(Path(np.__file__).parent / "**" / "*.py"), recursive=True))
    random.Random(0).shuffle(files)
    encoded = (tok(Path(f).read_text(errors="ignore"))["input_ids"] for f in files)  # read only as far as needed
    ids = torch.tensor(list(itertools.islice((i[:tokens] for i in encoded if len(i) >= tokens), sequences)))
    probs = []
    with torch.no_grad():
        for batch in ids.split(8):
            out = model(batch, output_router_logits=True)
            probs.append(torch.stack([r.view(*batch.shape, -1) for r in out.router_logits]).softmax(-1))
    p = torch.cat(probs, 1)
    return p.numpy(), p.topk(2, -1).indices.numpy()


def hit_rate(probs: np.ndarray, top: np.ndarray, k: int, alpha: float = 0.0, use: float = 1.0,
             lru: bool = False) -> float:
    """Hits of a k-slot cache per layer and sequence: LRU, or LRFU with admission whose worth gains ``use`` per
    use and ``alpha`` x the router probability of every expert at every step (decay ``LRFU_DECAY``)."""
    layers, seqs, steps, experts = probs.shape
    hits = total = 0
    for layer in range(layers):
        for s in range(seqs):
            resident: list[int] = []  # least recently used first
            worth = np.zeros(experts)
            for t in range(steps):
                need = list(dict.fromkeys(top[layer, s, t].tolist()))
                worth = worth * LRFU_DECAY + alpha * probs[layer, s, t]
                for e in need:
                    total += 1
                    if e in resident:
                        hits += 1
                        resident.remove(e)
                    elif len(resident) >= k:
                        others = [x for x in resident if x not in need]
                        victim = others[0] if lru else min(others, key=lambda x: worth[x])
                        if not lru and worth[e] + use <= worth[victim]:  # not admitted: computed, remembered
                            worth[e] += use
                            continue
                        resident.remove(victim)
                    resident.append(e)
                    worth[e] += use
    return hits / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    probs, top = router_trace(a.sequences)
    alphas = (0.5, 1.0, 2.0, 4.0)
    lines = ["# A soft eviction worth from the router's whole distribution (code-moe-22m, CPU)", "",
             f"`python -m bench.soft_worth --sequences {a.sequences}` ({probs.shape[1]} sequences of "
             f"{probs.shape[2]} tokens of numpy source; hit rate of a per-layer cache)", "",
             "| k | LRU | LRFU + admission (today) | " + " | ".join(f"soft, alpha {x}" for x in alphas)
             + " | router probabilities alone |", "|---" * (4 + len(alphas)) + "|"]
    for k in (2, 3, 4):
        cells = [hit_rate(probs, top, k, lru=True), hit_rate(probs, top, k)]
        cells += [hit_rate(probs, top, k, alpha=x) for x in alphas] + [hit_rate(probs, top, k, alpha=1.0, use=0.0)]
        lines.append(f"| {k} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
