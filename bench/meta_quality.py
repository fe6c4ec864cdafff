"""What 8-bit scale/zero tables (``QuantSpec.meta_bits`` 8) cost in quality (CPU, ~2 min; NOTES item 85).

    .venv/bin/python -m bench.meta_quality [--chunks 24] [--out bench/results/<date>-cpu-meta-quality.md]

1. Mixtral-shaped matrices (14336 × 4096, N(0, 1/4096), and the same with 1 weight in ~480 scaled ×25 as
   outliers) through hqq (g64, without its optimizer, which takes minutes a matrix on two cores): the weight's
   relative error with fp16 meta and with the tables, and how far the two dequantized weights are apart.
2. code-moe-22m (learned weights and routing, ``../shared/models``): held-out-style perplexity on Python source
   (this interpreter's standard library, chunks of 512 tokens) with its experts as in the checkpoint, hqq 2/3-bit
   g64 with fp16 meta, and the same with the tables, through transformers' Mixtral on the dequantized weights
   (``coordinator.reference``), attention unquantized so only the experts differ.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bench.cache_bound import emit
from expert_workers.format import INT2, INT2_M8, INT3, INT3_M8, QuantSpec
from expert_workers.meta8 import decode_meta8, encode_meta8

CODE_MOE = Path(__file__).resolve().parents[2] / "shared" / "models" / "code-moe-22m"
STDLIB_FILES = ("json/decoder.py", "argparse.py", "dataclasses.py", "functools.py", "pathlib/__init__.py",
                "pathlib.py", "textwrap.py", "shutil.py", "typing.py", "inspect.py")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def matrix_errors(bits: int, outliers: bool) -> dict[str, float]:
    """Relative weight errors of one Mixtral-shaped matrix, fp16 meta against tables."""
    from hqq.core.quantize import Quantizer

    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(14336, 4096, generator=gen) / 64
    if outliers:
        w[::97, ::5] *= 25
    w_q, meta = Quantizer.quantize(w, nbits=bits, group_size=64, axis=1, optimize=False, device="cpu")
    s16, z16 = meta["scale"].half(), meta["zero"].half()
    s8 = decode_meta8(encode_meta8(s16, torch.float16, log=True), torch.float16)
    z8 = decode_meta8(encode_meta8(z16, torch.float16, log=False), torch.float16)
    base = meta | {"compute_dtype": torch.float32}
    w16 = Quantizer.dequantize(w_q, base | {"scale": s16.float(), "zero": z16.float()}).float()
    w8 = Quantizer.dequantize(w_q, base | {"scale": s8.float(), "zero": z8.float()}).float()
    return {"fp16 meta": _rel(w16, w), "8-bit tables": _rel(w8, w), "tables vs fp16 meta": _rel(w8, w16),
            "max scale error": float(((s8.float() - s16.float()).abs() / s16.float()).max()),
            "max zero error": float((z8.float() - z16.float()).abs().max())}


def python_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text() for f in STDLIB_FILES if (lib / f).is_file())


def perplexity(spec: QuantSpec | None, ids: torch.Tensor, work: Path) -> float:
    """exp(mean next-token loss) over the [chunks, 512] ``ids``, experts from ``spec`` (None: the checkpoint)."""
    from coordinator.reference import reference_model
    from expert_workers.source import make_source
    from expert_workers.store import ExpertStore

    if spec is None:
        model = reference_model(CODE_MOE)
    else:
        with ExpertStore(CODE_MOE, "0/1", spec, cache_dir=work, progress=False) as store:
            model = reference_model(CODE_MOE, make_source(stores=[store.load()]))
    model = model.float()
    losses = []
    with torch.inference_mode():
        for row in ids:
            losses.append(float(model(row[None], labels=row[None]).loss))
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=24, help="512-token chunks of Python source")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    t0 = time.perf_counter()
    lines = ["# 8-bit scale/zero tables: what they cost in quality (CPU)", "",
             f"`python -m bench.meta_quality --chunks {a.chunks}`", "",
             "## Mixtral-shaped matrices (14336 × 4096, hqq g64 without its optimizer)", "",
             "| bits | weights | error, fp16 meta | error, 8-bit tables | tables vs fp16 meta | max scale error "
             "(relative) | max zero error (levels) |", "|---|---|---|---|---|---|---|"]
    for bits in (2, 3):
        for outliers in (False, True):
            e = matrix_errors(bits, outliers)
            lines.append(f"| {bits} | {'N(0, 1/4096) + outliers' if outliers else 'N(0, 1/4096)'} | "
                         f"{e['fp16 meta']:.4f} | {e['8-bit tables']:.4f} | {e['tables vs fp16 meta']:.4f} | "
                         f"{e['max scale error']:.4f} | {e['max zero error']:.4f} |")
            print(lines[-1], flush=True)
    from coordinator.engine import load_tokenizer

    tok = load_tokenizer(CODE_MOE)
    flat = torch.tensor(tok(python_text())["input_ids"])
    ids = flat[:a.chunks * 512].reshape(-1, 512)
    lines += ["", f"## code-moe-22m, perplexity on {ids.numel()} tokens of Python's standard library", "",
              "| experts | perplexity |", "|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for name, spec in (("checkpoint (fp16)", None), ("2-bit g64, fp16 meta", INT2),
                           ("2-bit g64, 8-bit tables", INT2_M8), ("3-bit g64, fp16 meta", INT3),
                           ("3-bit g64, 8-bit tables", INT3_M8)):
            lines.append(f"| {name} | {perplexity(spec, ids, Path(work)):.3f} |")
            print(lines[-1], flush=True)
    emit(lines + ["", f"Ran in {time.perf_counter() - t0:.0f} s."], a.out)


if __name__ == "__main__":
    main()
