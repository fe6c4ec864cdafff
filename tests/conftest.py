"""Shared fixtures: a per-session cache dir, tiny checkpoints, and real server processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from deploy.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"

# Ray must never bind the machine's external interface in tests.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def moe_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds models and quantization caches in its own directory."""
    path = tmp_path_factory.mktemp("moe-cache")
    os.environ["MOE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(moe_cache_dir: Path) -> Path:
    """The ``tiny-random`` checkpoint (Mixtral's w1/w2/w3 layout, one safetensors file, tokenizer)."""
    from modelzoo import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2(moe_cache_dir: Path) -> tuple[Path, tuple]:  # type: ignore[type-arg]
    """``smollm2-moe`` built once in the session cache (where ``python -m deploy demo`` finds it too), from the
    one load of the dense GGUF model that test_smollm2 also uses as its reference: (checkpoint, (model, tokenizer))."""
    import torch

    from modelzoo import cache_dir
    from modelzoo.smollm2 import build_smollm2_moe, load_dense

    dense = load_dense(torch.float32)
    return build_smollm2_moe(cache_dir() / "models" / "smollm2-moe", loaded=dense), dense


@pytest.fixture(scope="session")
def exact_workers(tiny_ckpt: Path) -> Iterator[list[ServerProcess]]:
    """``tiny-random`` over 2 expert worker processes (``--expert-bits 16``, exact mode) on 127.0.0.1, for the
    modules that drive them and a coordinator in front of them (test_client, test_coordinator): started once per
    session, as those modules form one group (``SHARED_FIXTURES``)."""
    servers = spawn_workers(tiny_ckpt, 2, ["--expert-bits", "16", "--no-progress"])
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def exact_coordinator(tiny_ckpt: Path, exact_workers: list[ServerProcess]) -> Iterator[Callable[[], ServerProcess]]:
    """``running()`` -> a ``python -m coordinator serve`` process in front of ``exact_workers`` (``--attn-bits
    16``: tokens equal transformers'; one expert slot per layer and prefetch 2, so decode steps fetch; at most 8
    waiting requests), shared by test_client and test_coordinator. A new one is started when none runs (the
    last test of test_coordinator stops it with SIGTERM), so any order of the modules works."""
    started: list[ServerProcess] = []

    def running() -> ServerProcess:
        if not started or started[-1].proc.poll() is not None:
            started.append(start_server(["coordinator", "serve", "--model", str(tiny_ckpt), "--port", "0",
                                         "--device", "cpu", "--workers", ",".join(w.address for w in exact_workers),
                                         "--attn-bits", "16", "--experts-per-layer", "1", "--prefetch", "2",
                                         "--max-queue", "8"], env={"OMP_NUM_THREADS": "1"}))
        return started[-1]

    yield running
    for server in started:
        server.stop()


DEPLOY_TOKEN = "deploy-auth-s3cret-7f9c"
"""The shared token of the secured deployments of test_deploy and test_deploy_auth (their ``TOKEN``)."""


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ``token`` file holding ``DEPLOY_TOKEN`` and a self-signed ``key``/``cert`` pair (SAN 127.0.0.1: every
    server of test_deploy's cluster binds it), made once per module that uses it (test_deploy, test_deploy_auth)."""
    from test_security import _self_signed

    d = tmp_path_factory.mktemp("deploy-secrets")
    token = d / "token"
    token.write_text(DEPLOY_TOKEN + "\n")
    key, cert = _self_signed(d)
    return {"token": token, "key": key, "cert": cert}


@pytest.fixture
def local_ray(moe_cache_dir: Path) -> Iterator[None]:
    """An in-process local Ray (``ray.init``) on 127.0.0.1 shared by consecutive tests that drive actors
    themselves: 2 CPUs, an ``expert_host`` capacity of 2, a 256 MiB object store. Tests name their own
    namespaces and kill the actors they create, so the next one starts on an empty cluster. It is shut down
    after the last of a run of such tests (``pytest_runtest_teardown``); they run last among the Ray tests."""
    ray = pytest.importorskip("ray")
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # set above: loopback only
    if not ray.is_initialized():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 resources={"expert_host": 2}, object_store_memory=256 * 2**20, log_to_driver=False,
                 runtime_env={"env_vars": {"MOE_CACHE_DIR": str(moe_cache_dir)}})
    yield


def _uses_local_ray(item: pytest.Item | None) -> bool:
    return item is not None and "local_ray" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _uses_local_ray(item) and not _uses_local_ray(nextitem):
        import ray

        ray.shutdown()


GROUPS_FILE_ENV = "MOE_TEST_GROUPS_FILE"
"""Where xdist workers write each test's group for the controller's scheduler (``GroupScheduling``)."""


LONGEST_GROUPS = ("smollm2", "tests/test_deploy.py", "ray", "tests/test_workers_grpc.py",
                  "tests/test_gpu_kernels.py", "tests/test_reliability_failover.py", "tests/test_auth_e2e.py",
                  "tests/test_cache.py")
"""Measured on 2 cores, the longest groups, longest first (``smollm2`` ~3 min with the demo, test_deploy ~3 min,
``ray`` ~2.5 min, the modules ~45-90 s): they are handed out first, so the two workers run out of work at about
the same time."""

RAY_DEFAULT_PORTS = ("local_ray", "sshd")
"""Fixtures whose Ray takes Ray's default ports: ``ray.init`` (local_ray) and `ray up` (test_ray_up's sshd).
Their tests form the ``ray`` group, one after the other. A ``LocalRay`` (test_deploy's, the demo's) takes free
ports, so it runs beside them."""


SHARED_FIXTURES = ("smollm2", "exact_workers")
"""Session fixtures that several modules use: those modules form one group named after it, so one xdist worker
sets it up once (``smollm2``: one build of the model, one dense model in memory)."""


def _module_groups(items: list[pytest.Item]) -> dict[str, str]:
    """Test module path -> its group: the ``SHARED_FIXTURES`` one if a test uses it; else ``ray`` if a test uses
    a ``RAY_DEFAULT_PORTS`` fixture (those run one after the other, and local_ray's users share one cluster);
    else the module itself (its fixtures are set up once)."""
    groups: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        fixtures = getattr(item, "fixturenames", ())
        if shared := next((f for f in SHARED_FIXTURES if f in fixtures), None):
            groups[module] = shared
        elif any(f in fixtures for f in RAY_DEFAULT_PORTS) and groups.get(module) not in SHARED_FIXTURES:
            groups[module] = "ray"
        else:
            groups.setdefault(module, module)
    return groups


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Orders the tests by group: the ``LONGEST_GROUPS``, then the other modules (under ``-n 2`` the long groups
    start first); ``local_ray``'s users back to back at the end of ``ray`` (one cluster for all of them, never
    beside another Ray test on default ports). An xdist worker also records the groups for the scheduler."""
    groups = _module_groups(items)
    group_of = {item.nodeid: groups[item.nodeid.split("::")[0]] for item in items}
    order = {group: i for i, group in enumerate(LONGEST_GROUPS)}
    items.sort(key=lambda item: (order.get(group_of[item.nodeid], len(order)), _uses_local_ray(item)))  # stable
    groups_file = os.environ.get(GROUPS_FILE_ENV)
    if groups_file and hasattr(config, "workerinput"):
        tmp = Path(f"{groups_file}.{config.workerinput['workerid']}")
        tmp.write_text(json.dumps(group_of))
        tmp.replace(groups_file)  # every worker collects the same tests: the same content


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        # An xdist worker shares the cores with the others: torch's thread pool (here and, through
        # OMP_NUM_THREADS, in the servers and CLIs it starts) gets its share instead of every core, so the
        # workers' threads do not spin against each other's (a model forward took several times longer so).
        threads = max(1, (os.cpu_count() or 1) // int(config.workerinput.get("workercount", 1)))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return
    if not config.pluginmanager.hasplugin("xdist"):
        return
    fd, groups_file = tempfile.mkstemp(prefix="moe-test-groups-", suffix=".json")
    os.close(fd)
    os.environ[GROUPS_FILE_ENV] = groups_file  # inherited by the workers xdist starts
    config.add_cleanup(lambda: Path(groups_file).unlink(missing_ok=True))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` (``make test`` runs ``-n 2``) with the groups of ``_group``: a group runs on one
    worker, in collection order; the next group goes to whichever worker runs out of work first.
    (xdist's own loadgroup reads ``xdist_group`` marks through ``item._nodeid``, which pytest 9.2 ignores.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # written by the workers while collecting, read once they all have
                self.groups = json.loads(Path(os.environ[GROUPS_FILE_ENV]).read_text())
            return self.groups.get(nodeid, nodeid.split("::")[0])

    config.option.loadscopereorder = False  # keep pytest_collection_modifyitems' order
    return GroupScheduling(config, log)


def start_server(args: Sequence[str], timeout: float = 180.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Runs ``python -m <args>`` with ``env`` over this process's environment and waits for its ``serving on
    HOST:PORT`` line. Raises with the process output if it exits or times out first."""
    return ServerProcess.start(args, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def spawn_server() -> Iterator:
    """``spawn_server([...module args...])`` -> ServerProcess; every process is stopped after the test."""
    started: list[ServerProcess] = []

    def spawn(args: Sequence[str], **kw: object) -> ServerProcess:
        server = start_server(args, **kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield spawn
    for server in started:
        server.stop()


def spawn_workers(ckpt: Path, n: int, extra: Sequence[str] = (), replicas: int = 1) -> list[ServerProcess]:
    """Starts ``n`` shards x ``replicas`` expert workers on 127.0.0.1 (caller stops them)."""
    servers: list[ServerProcess] = []
    try:
        for replica in range(replicas):
            for i in range(n):
                servers.append(start_server(["expert_workers", "serve", "--model", str(ckpt), "--shard",
                                             f"{i}/{n}", "--port", "0", "--replica", str(replica), *extra]))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers
