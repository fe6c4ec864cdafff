"""``make demo`` runs ``python -m deploy demo``: this runs exactly that command and checks what it promises:
generated text and stats printed, every step done, every process stopped, exit status 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psutil
import pytest

from conftest import REPO
from client import STATS_KEYS

pytestmark = pytest.mark.slow


def test_make_demo_command_runs_the_whole_system_and_cleans_up(smollm2: tuple) -> None:  # type: ignore[type-arg]
    # smollm2: the session's build of the model in $MOE_CACHE_DIR, which the demo uses (test_smollm2 checks it)
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: venv\n\t\$\(PY\) -m deploy demo$", make, re.M), "make demo runs something else"
    out = subprocess.run([sys.executable, "-m", "deploy", "demo"], cwd=REPO, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    text = re.search(r"^output: (.*)$", out.stdout, re.M)
    assert text and len(text.group(1).split()) >= 5, out.stdout  # real words from smollm2-moe
    assert "finish_reason: length   tokens: 32" in out.stdout
    stats = json.loads(re.search(r"^stats: (\{.*?^\})", out.stdout, re.M | re.S).group(1))  # type: ignore[union-attr]
    assert set(STATS_KEYS) <= set(stats) and stats["generated_tokens"] == 32
    assert stats["expert_uses"] == stats["cache_hits"] + stats["cache_misses"] > 0
    for step in ("deploy up", "deploy status", "deploy down", "stopping Ray", "done: every process stopped"):
        assert step in out.stdout
    stopped = re.search(r"^stopped (\d+) processes: ([\d ]*)$", out.stdout, re.M)
    assert stopped and int(stopped.group(1)) >= 5, out.stdout  # head, raylet, gcs, workers, coordinator, ...
    alive = [p for p in map(int, stopped.group(2).split()) if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]
