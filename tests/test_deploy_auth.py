"""``python -m deploy up --auth-token-file F --tls-cert C --tls-key K --tls-root R``: settings that cannot work are
refused before the cluster is touched, the token travels as a file path only, and the decode settings reach the
coordinator's command line.

The secured deployment itself (worker actors and coordinator requiring the token over TLS, the health service
open, the token on no command line and in no Ray log) runs in test_deploy, on the cluster and ``deploy up`` that
also scale, restart and remove it: that deployment is secured, so one cluster serves both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEPLOY_TOKEN as TOKEN
from conftest import REPO

from deploy.spec import DeploySpec
from expert_workers.security import TOKEN_ENV
from expert_workers.server import ServerConfig


def deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_security_settings_are_refused_before_the_cluster(tmp_path: Path, secrets: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = ["up", "--model", "tiny-random", "--workers", "1", "--address", "127.0.0.1:1"]  # nothing listens there
    cases = [(["--auth-token-file", str(tmp_path / "missing")], "cannot read"),
             (["--auth-token-file", str(empty)], "is empty"),
             (["--tls-cert", str(secrets["cert"]), "--tls-key", str(secrets["key"])], "--tls-root")]
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "RAY_ADDRESS")}
    for extra, message in cases:
        out = deploy(env, *base, *extra)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)


def test_the_token_travels_as_a_path(tmp_path: Path, secrets: dict[str, Path]) -> None:
    spec = DeploySpec(model="tiny-random", auth_token_file=str(secrets["token"]), tls_cert=str(secrets["cert"]),
                      tls_key=str(secrets["key"]), tls_root=str(secrets["cert"]))
    args = spec.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert TOKEN not in " ".join(args) and "--auth-token-file" in args and "--worker-tls-root" in args
    with pytest.raises(ValueError, match="absolute path"):
        DeploySpec(model="tiny-random", auth_token_file="token")
    config = ServerConfig(auth_token_file=str(secrets["token"])).resolved()
    assert config.auth_token == TOKEN and TOKEN not in repr(config) and TOKEN not in repr(config.security)
    with pytest.raises(ValueError, match="cannot read the auth token file"):
        ServerConfig(auth_token_file=str(tmp_path / "missing")).resolved()


def test_coordinator_args_carry_the_decode_settings() -> None:
    """``deploy up --prefetch N --prefetch-ahead A --repartition-every S --eviction E --decode MODE
    --no-speculate --no-pipeline --no-admission --lm-head-bits B`` reach the coordinator's command line; bad
    values are refused before anything starts."""
    spec = DeploySpec(model="tiny-random", prefetch=3, prefetch_ahead=2, decode="static")
    args = spec.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert args[args.index("--prefetch") + 1] == "3" and args[args.index("--prefetch-ahead") + 1] == "2"
    assert args[args.index("--decode") + 1] == "static" and "--no-speculate" not in args
    assert "--no-pipeline" not in args and "--no-admission" not in args
    assert args[args.index("--lm-head-bits") + 1] == "16"
    from deploy.__main__ import _parser, _spec

    assert args[args.index("--repartition-every") + 1] == "32" and args[args.index("--eviction") + 1] == "lrfu"
    quiet = _spec(_parser().parse_args(["up", "--model", "tiny-random", "--workers", "1", "--no-speculate",
                                        "--no-pipeline", "--repartition-every", "0", "--eviction", "lru",
                                        "--no-admission", "--lm-head-bits", "4"]))
    quiet_args = quiet.coordinator_args("127.0.0.1:6379", 0, 0, "cpu")
    assert not quiet.speculate and "--no-speculate" in quiet_args
    assert not quiet.pipeline and "--no-pipeline" in quiet_args
    from coordinator.__main__ import parse_args

    parsed = parse_args(quiet_args)  # and the coordinator takes them
    assert parsed.no_pipeline and parsed.repartition_every == 0 and parsed.eviction == "lru"
    assert not quiet.admission and not parsed.admission and parsed.lm_head_bits == 4
    from coordinator.config import DECODE_MODES
    from deploy.spec import DECODE_MODES as DEPLOY_DECODE_MODES

    assert DEPLOY_DECODE_MODES == DECODE_MODES  # deploy keeps its own copy to stay free of torch
    from coordinator.config import EVICTIONS
    from deploy.spec import EVICTIONS as DEPLOY_EVICTIONS

    assert DEPLOY_EVICTIONS == EVICTIONS
    from coordinator.config import ATTN_BITS
    from deploy.spec import ATTN_BITS as DEPLOY_ATTN_BITS

    assert DEPLOY_ATTN_BITS == ATTN_BITS
    from deploy.spec import META_BITS as DEPLOY_META_BITS
    from expert_workers.format import META_BITS

    assert DEPLOY_META_BITS == META_BITS
    for bad in ({"prefetch": -1}, {"prefetch_ahead": 3}, {"decode": "fast"}, {"repartition_every": -1},
                {"eviction": "fifo"}, {"lm_head_bits": 3}, {"meta_bits": 4}):
        with pytest.raises(ValueError, match="prefetch|decode|repartition|eviction|lm_head|meta bits"):
            DeploySpec(model="tiny-random", **bad)  # type: ignore[arg-type]
