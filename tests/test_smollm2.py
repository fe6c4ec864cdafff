"""``smollm2-moe``: the upcycled checkpoint has Mixtral's layout and greedy-decodes exactly like dense SmolLM2.

The reference is transformers' own ``LlamaForCausalLM`` dequantized from the same GGUF file, both in float32
(the dtype the checkpoint stores; see modelzoo.smollm2 for why a 16-bit dtype cannot be exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelzoo import resolve_model

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time,")


@pytest.fixture(scope="module")
def moe_dir(smollm2: tuple[Path, tuple]) -> Path:  # type: ignore[type-arg]
    return smollm2[0]


@pytest.fixture(scope="module")
def dense(smollm2: tuple[Path, tuple]):  # type: ignore[no-untyped-def, type-arg]
    """transformers' dense SmolLM2 from the GGUF file (the load the session's smollm2-moe build used)."""
    return smollm2[1]


def test_checkpoint_is_mixtral_with_copied_experts(moe_dir: Path, dense) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    config = json.loads((moe_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert config["rope_parameters"]["rope_theta"] == dense[0].config.rope_parameters["rope_theta"]
    weight_map = json.loads((moe_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # tied to the embeddings
    assert not any(".mlp." in name for name in weight_map)
    state = dense[0].state_dict()
    for layer in (0, 29):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        with safe_open(moe_dir / weight_map[f"{prefix}gate.weight"], "pt") as f:
            assert f.get_tensor(f"{prefix}gate.weight").shape == (8, 576)
            for role, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                ref = state[f"model.layers.{layer}.mlp.{proj}.weight"]
                for e in range(8):
                    assert torch.equal(f.get_tensor(f"{prefix}experts.{e}.{role}.weight"), ref), (layer, role, e)
            name = f"model.layers.{layer}.self_attn.q_proj.weight"
            assert torch.equal(f.get_tensor(name), state[name])
    assert (moe_dir / "tokenizer.json").is_file()
    assert "<|im_start|>" in (moe_dir / "chat_template.jinja").read_text()


def test_greedy_tokens_equal_dense_smollm2(moe_dir: Path, dense) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer, MixtralForCausalLM

    dense_model, dense_tok = dense
    moe = MixtralForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(moe_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    prompts = [*PROMPTS, chat]
    for prompt in prompts:
        assert tok(prompt).input_ids == dense_tok(prompt).input_ids
    tok.padding_side = "left"  # one batch for all prompts: both models decode the very same padded batch
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = moe.generate(**batch, max_new_tokens=20, do_sample=False)[:, batch.input_ids.shape[1]:].tolist()
        want = dense_model.generate(**batch, max_new_tokens=20, do_sample=False)[:, batch.input_ids.shape[1]:].tolist()
    for prompt, g, w in zip(prompts, got, want):
        assert g == w, (prompt, tok.decode(g), tok.decode(w))
        assert len(set(g)) > 1  # a real continuation, not one repeated token


def test_built_once(moe_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in moe_dir.iterdir()}
    assert resolve_model("smollm2-moe") == moe_dir
    assert {p.name: p.stat().st_mtime_ns for p in moe_dir.iterdir()} == before
    assert not list(moe_dir.parent.glob(".smollm2-moe-*"))  # no temp dir left behind
