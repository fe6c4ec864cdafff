"""``client.Client`` and ``python -m client`` against a live system: two expert worker processes
(``--expert-bits 16``) and a ``python -m coordinator serve`` process on 127.0.0.1 (``--attn-bits 16``), so
greedy tokens must equal transformers' own Mixtral on the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import (STATS_KEYS, Client, ClientError, DeadlineExceededError, GenerateResult, InvalidArgumentError,
                    StreamChunk, UnavailableError)
from conftest import REPO, ServerProcess
from coordinator.reference import greedy, reference_model

PROMPT_IDS = [5, 9, 33, 70, 100]


@pytest.fixture(scope="module")
def coordinator(exact_coordinator: Callable[[], ServerProcess]) -> ServerProcess:
    """The session's coordinator process and its 2 worker processes (conftest), shared with test_coordinator."""
    return exact_coordinator()


@pytest.fixture(scope="module")
def client(coordinator: ServerProcess) -> Iterator[Client]:
    with Client(coordinator.address, timeout_s=120) as c:
        yield c


def test_generate_returns_typed_result_equal_to_transformers(tiny_ckpt: Path, client: Client) -> None:
    r = client.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=12)
    assert isinstance(r, GenerateResult)
    assert r.token_ids == greedy(reference_model(tiny_ckpt), PROMPT_IDS, 12)  # generated ids only
    assert r.finish_reason == "length" and len(r.token_ids) == 12
    assert set(STATS_KEYS) <= set(r.stats)
    assert r.stats["generated_tokens"] == 12 and r.stats["prompt_tokens"] == len(PROMPT_IDS)
    assert isinstance(r.stats["cache_hits"], int) and isinstance(r.stats["ttft_ms"], float)
    assert r.stats["expert_uses"] == r.stats["cache_hits"] + r.stats["cache_misses"]
    with pytest.raises(AttributeError):
        r.text = "changed"  # type: ignore[misc]  # frozen


def test_text_prompt_and_its_token_ids_agree(tiny_ckpt: Path, client: Client) -> None:
    from transformers import AutoTokenizer

    prompt = "Hello, wörld"
    by_text = client.generate(prompt, max_new_tokens=10)
    ids = AutoTokenizer.from_pretrained(tiny_ckpt)(prompt)["input_ids"]
    by_ids = client.generate(prompt_token_ids=ids, max_new_tokens=10)
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text
    assert by_text.stats["prompt_tokens"] == len(ids)


def test_stream_yields_the_same_tokens_as_generate(client: Client) -> None:
    whole = client.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=8)
    stream = client.stream(prompt_token_ids=PROMPT_IDS, max_new_tokens=8)
    chunks = list(stream)
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert [c.token_id for c in chunks] == whole.token_ids and [c.index for c in chunks] == list(range(8))
    assert "".join(c.text for c in chunks) == whole.text
    assert stream.finish_reason == "length" and stream.stats["generated_tokens"] == 8
    assert stream.result().token_ids == whole.token_ids


def test_seeded_sampling_is_reproducible(client: Client) -> None:
    kwargs = dict(prompt_token_ids=[1, 2, 3], max_new_tokens=10, temperature=1.5, top_p=0.9)
    a = client.generate(seed=7, **kwargs)  # type: ignore[arg-type]
    b = client.generate(seed=7, **kwargs)  # type: ignore[arg-type]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


def test_stats_and_health(client: Client) -> None:
    before = client.stats()
    client.generate(prompt_token_ids=[7, 8], max_new_tokens=3)
    after = client.stats()
    assert set(STATS_KEYS) <= set(after)
    assert after["generated_tokens"] == before["generated_tokens"] + 3
    assert client.health() == "SERVING"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"text": ""}, "empty"),
    ({"prompt_token_ids": [1, 2], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_token_ids": [1, 2], "temperature": -1.0}, "temperature"),
    ({"prompt_token_ids": [1, 2], "top_p": 1.5}, "top_p"),
])
def test_server_rejections_are_invalid_argument(client: Client, kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT" and fragment in str(info.value)
    assert isinstance(info.value, ClientError) and isinstance(info.value, ValueError)
    assert len(client.generate(prompt_token_ids=[1, 2], max_new_tokens=2).token_ids) == 2  # still serving


@pytest.mark.parametrize("kwargs", [
    {"text": "a", "prompt_token_ids": [1]},
    {},
    {"prompt_token_ids": [-1]},
    {"prompt_token_ids": [1], "seed": -5},
])
def test_requests_the_wire_cannot_carry_fail_before_sending(client: Client, kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT"


def test_per_call_timeout_is_deadline_exceeded(client: Client) -> None:
    with pytest.raises(DeadlineExceededError) as info:
        client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=200, timeout_s=0.05)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert client.health(timeout_s=10) == "SERVING"


def test_leaving_a_stream_early_cancels_it(client: Client) -> None:
    before = client.stats()["requests_cancelled"]
    for chunk in client.stream(prompt_token_ids=[1, 2, 3], max_new_tokens=200):
        if chunk.index == 2:
            break
    deadline = time.monotonic() + 30
    while client.stats()["requests_cancelled"] == before:
        assert time.monotonic() < deadline, "leaving the loop did not cancel the decode"
        time.sleep(0.2)


def test_unreachable_address_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout_s=5) as c:
        with pytest.raises(UnavailableError) as info:
            c.health()
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(UnavailableError):
            c.generate("hi")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_generate_prints_the_text(coordinator: ServerProcess, client: Client) -> None:
    want = client.generate("Hello", max_new_tokens=6)
    out = _cli("generate", "Hello", "--address", coordinator.address, "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    streamed = _cli("generate", "Hello", "--address", coordinator.address, "--max-new-tokens", "6", "--stream",
                    "--stats")
    assert streamed.returncode == 0, streamed.stderr
    text, _, stats = streamed.stdout.partition("\n")
    assert text == want.text
    report = json.loads(stats)
    assert report["token_ids"] == want.token_ids and report["stats"]["generated_tokens"] == 6


def test_cli_errors_exit_1_with_the_status(coordinator: ServerProcess) -> None:
    bad = _cli("generate", "Hello", "--address", coordinator.address, "--temperature", "-2")
    assert bad.returncode == 1 and bad.stderr.startswith("error: INVALID_ARGUMENT")
    down = _cli("health", "--address", "127.0.0.1:1", "--timeout", "5")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    ok = _cli("health", "--address", coordinator.address)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
