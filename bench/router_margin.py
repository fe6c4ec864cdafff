"""How near to a tie the routers of a tiny checkpoint come (CPU; NOTES item 81).

    .venv/bin/python -m bench.router_margin

Two engines that differ only in kernel rounding (fp16 GEMVs against hqq's dequantize + matmul) give the same
logits within ~0.1%, unless a router's 2nd and 3rd expert scores are nearer than that rounding: then the two
pick different experts and the logits part by far more. This prints, for the two tiny checkpoints the GPU
lm_head test has been built from, the smallest gap (2nd − 3rd router logit, relative to the largest |logit|)
over the test's prompts and 12 greedy tokens, in transformers' fp32 forward.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

PROMPTS = ([5, 9, 33], list(range(10, 30)))


def smallest_gaps(ckpt: Path, steps: int = 12) -> list[float]:
    """Per router call, the smallest relative 2nd-3rd gap over its positions; the five smallest, ascending."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    gaps: list[float] = []

    def hook(_mod: torch.nn.Module, _inp: tuple, out: torch.Tensor | tuple) -> None:
        logits = (out[0] if isinstance(out, tuple) else out).float()
        top = logits.reshape(-1, logits.shape[-1]).sort(-1, descending=True).values
        gaps.append(float(((top[:, 1] - top[:, 2]) / top.abs().amax(-1).clamp_min(1e-6)).min()))

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        for prompt in PROMPTS:
            model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
    return sorted(gaps)[:5]


def main() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from modelzoo.tiny import TinySpec, build_tiny_random

    work = Path(tempfile.mkdtemp(prefix="router-margin-"))
    spec = TinySpec(layers=2, hidden=256, intermediate=512, dtype="float16", vocab=512)
    built = {"TinySpec (session 13's failed form)": build_tiny_random(work / "tinyspec", spec)}
    torch.manual_seed(0)  # the test's hand-built config, transformers' default init
    MixtralForCausalLM(MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256,
                                     tie_word_embeddings=False)).half().save_pretrained(work / "hand")
    built["hand-built MixtralConfig (passes)"] = work / "hand"
    print("| checkpoint | five smallest relative 2nd-3rd router gaps |\n|---|---|")
    for name, ckpt in built.items():
        print(f"| {name} | {', '.join(f'{g:.1e}' for g in smallest_gaps(ckpt))} |")


if __name__ == "__main__":
    main()
