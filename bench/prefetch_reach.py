"""How far ahead can a layer's hidden state guess a later layer's experts? (CPU; a local checkpoint, local text)

The coordinator guesses layer l+1's experts by applying layer l+1's router (through its post-attention norm) to
the residual stream after layer l's attention: one segment (~0.35 ms on the H200) before they are needed, while
a 2-bit Mixtral expert takes ~1 ms to copy. A guess made d layers ahead leaves d segments. This measures what
that costs in accuracy: for d = 1..D, the share of the experts each token actually uses that the top-n guess
contains (n = 1..4), over text read from local files (never downloaded)::

    python -m bench.prefetch_reach --model ../shared/models/code-moe-22m --text-glob '.venv/lib/python3*/site-packages/torch/nn/*.py'
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, MixtralForCausalLM


def sequences(tokenizer: object, pattern: str, count: int, length: int) -> list[list[int]]:
    """``count`` chunks of ``length`` tokens from the files matching ``pattern`` (sorted, so runs repeat)."""
    out: list[list[int]] = []
    for path in sorted(glob.glob(pattern, recursive=True)):
        ids = tokenizer(Path(path).read_text(errors="ignore"))["input_ids"]  # type: ignore[operator]
        out += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
        if len(out) >= count:
            break
    return out[:count]


@torch.inference_mode()
def measure(model: MixtralForCausalLM, seqs: list[list[int]], reach: int, top: int) -> dict[str, float]:
    """found[d][n] / used: recall of the top-n guess made d layers ahead, over target layers reach..L-1."""
    layers = model.model.layers
    L, K = len(layers), model.config.num_experts_per_tok
    after_attn: dict[int, torch.Tensor] = {}  # residual after layer i's attention, before its experts
    after_layer: dict[int, torch.Tensor] = {}  # residual after layer i's experts too (layer i+1's input)

    capturing = [False]  # the norms are called again below to make the guesses: only the forward is recorded

    def keep(store: dict[int, torch.Tensor], i: int) -> object:
        def hook(mod: object, args: tuple[torch.Tensor, ...], out: object) -> None:
            if capturing[0]:
                store[i] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [layer.post_attention_layernorm.register_forward_hook(keep(after_attn, i)) for i, layer in enumerate(layers)]
    hooks += [layer.input_layernorm.register_forward_hook(keep(after_layer, i - 1)) for i, layer in enumerate(layers)]

    def logits(layer: int, h: torch.Tensor) -> torch.Tensor:  # [T, E]: layer's router on h, through its norm
        return F.linear(layers[layer].post_attention_layernorm(h), layers[layer].mlp.gate.weight).float()

    found = torch.zeros(2, reach + 1, top + 1)
    used = torch.zeros(2, reach + 1)
    try:
        for ids in seqs:
            capturing[0] = True
            model(input_ids=torch.tensor([ids]))
            capturing[0] = False
            routed = {m: torch.topk(torch.softmax(logits(m, after_attn[m]), -1), K, dim=-1).indices for m in range(L)}
            for src, states in enumerate((after_attn, after_layer)):
                for d in range(1, reach + 1):
                    for target in range(reach, L):  # the same target layers in every row, so rows compare
                        layer = target - d
                        guess = torch.topk(logits(layer + d, states[layer]), top, dim=-1).indices  # [T, top]
                        real = routed[target]  # [T, K]
                        used[src, d] += real.numel()
                        for n in range(1, top + 1):
                            found[src, d, n] += (guess[:, :n, None] == real[:, None, :]).any(1).sum()
    finally:
        for h in hooks:
            h.remove()
    return {f"{SOURCES[src]} d{d}_top{n}": float(found[src, d, n] / used[src, d])
            for src in range(2) for d in range(1, reach + 1) for n in range(1, top + 1)}


SOURCES = ("after attention", "after the layer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local Mixtral-architecture checkpoint directory")
    ap.add_argument("--text-glob", required=True, help="local text files to route (glob, ** allowed)")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--reach", type=int, default=3, help="largest distance d (layers ahead)")
    ap.add_argument("--top", type=int, default=4, help="largest guess size n")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = MixtralForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    seqs = sequences(tokenizer, a.text_glob, a.sequences, a.length)
    res = measure(model, seqs, a.reach, a.top)
    print(f"{len(seqs)} sequences x {a.length} tokens, {time.perf_counter() - t0:.0f} s")
    print("| guess from layer l's residual | layers ahead d | " + " | ".join(f"top-{n}" for n in range(1, a.top + 1))
          + " |")
    print("|---|---|" + "---|" * a.top)
    for src in SOURCES:
        for d in range(1, a.reach + 1):
            print(f"| {src} | {d} | " + " | ".join(f"{res[f'{src} d{d}_top{n}']:.3f}" for n in range(1, a.top + 1))
                  + " |")


if __name__ == "__main__":
    main()
