"""Merges the JSON results of several GPU calls into one table (rows keep a ``run`` tag naming their call).

    python -m bench.merge_results OUT_STEM TAG=FILE[:[VARIANT_PREFIX][@CAP][#BITS]] ...

The first file gives the environment and bandwidth; kernel numbers come from the first file that has them. A selector keeps only rows whose variant
starts with VARIANT_PREFIX (and, with @CAP, whose cap equals CAP; with #BITS, whose expert bits equal BITS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import report


def merge(out_stem: str, specs: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {"runs": [], "sources": []}
    for spec in specs:
        tag, _, rest = spec.partition("=")
        path, _, sel = rest.partition(":")
        where, _, bits = sel.partition("#")
        prefix, _, cap = where.partition("@")
        data = json.loads(Path(path).read_text())
        first = "env" not in merged
        for k in ("env", "bandwidth", "shm_probe", "kernels", "kernels3", "shape", "prompt", "resident_model_bytes"):
            if k in data and (first or k.startswith("kernels")) and k not in merged:
                merged[k] = data[k]
        merged["sources"].append({"run": tag, "file": Path(path).name, "argv": data.get("env", {}).get("argv"),
                                  "date": data.get("env", {}).get("date"), "selector": sel or "all"})
        for row in data.get("runs", []):
            if prefix and not row["variant"].startswith(prefix):
                continue
            if cap and row.get("cap_gb") != float(cap):
                continue
            if bits and row.get("bits") != int(bits):
                continue
            if "skipped" in row and "profile" not in row:   # budget skips / failed attempts stay in the run files
                continue
            merged["runs"].append({**row, "run": tag})
    report.finish(merged)
    Path(out_stem + ".json").write_text(json.dumps(merged, indent=1, default=str))
    Path(out_stem + ".md").write_text(report.markdown(merged))
    return merged


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    m = merge(sys.argv[1], sys.argv[2:])
    print(report.table(m))
