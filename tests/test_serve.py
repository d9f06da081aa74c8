"""`prm-jax serve` on 127.0.0.1, in this process (a thread with its own event loop, real sockets).

References: every step score is checked against offline scoring of the same (problem, steps) with
`PRMScorer.score` (the `prm-jax eval` path, itself checked against transformers in test_eval_run),
and text inputs against a plain eager forward of the model on that text's token ids
(`models.prm.step_rewards`), so neither the batcher nor the HTTP layer is its own reference.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import httpx
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import spread_tiny_prm
from prm_jax.data.prm_format import encode_prm
from prm_jax.evaluation.scoring import PRMScorer
from prm_jax.models.prm import step_rewards
from prm_jax.rewards import StepReward
from prm_jax.serving.batcher import BatchConfig, Batcher, EncodedScorer, warm_up
from prm_jax.serving.server import BackgroundServer, ServeConfig, make_app

MAX_LEN = 256
BUCKETS = (128, 256)
NAME = "tiny-prm"
PROBLEMS = ["Tom has 3 apples and buys 12 more. How many apples does he have?", "What is 15 * 4 - 7?",
            "Half of 56?", "Step 1: 7 * 8 = 56. Step 2: 56 / 2 = 28. So the total is 28 dollars."]
STEPS = ["3 + 12 = 15", "15 * 4 = 60", "60 - 7 = 53", "The answer is \\boxed{53}.", "56 / 2 = 28",
         "So the total is 28 dollars.", "7 * 8 = 56"]


def item(k: int) -> tuple[str, list[str]]:
    """The k-th distinct (problem, steps) pair: 1 to 5 steps, ragged lengths."""
    n = 1 + k % 5
    return PROBLEMS[k % 4] + " " * (k // 20), [STEPS[(k + j) % len(STEPS)] for j in range(n)]


@pytest.fixture(scope="module")
def tiny_prm(toy_tokenizer):
    return spread_tiny_prm(len(toy_tokenizer), seed=0)


@pytest.fixture(scope="module")
def offline(tiny_prm, toy_tokenizer, mesh):
    """Offline eval's scores: PRMScorer.score over a list of (problem, steps)."""
    scorer = PRMScorer(tiny_prm, toy_tokenizer, batch_size=32, max_length=MAX_LEN, buckets=BUCKETS, mesh=mesh)
    return scorer.score


def new_scorer(prm, tokenizer, mesh, cls=EncodedScorer):
    return cls(prm, tokenizer, batch_size=32, max_length=MAX_LEN, buckets=BUCKETS, mesh=mesh)


def serve(scorer, batch=BatchConfig(max_batch_tokens=64 * MAX_LEN, max_wait_ms=5, max_queue=256), **config):
    batcher = Batcher(scorer, batch)
    rewarder = StepReward(scorer, "min", "blank-line")
    cfg = ServeConfig(NAME, **{"max_body_bytes": 1 << 20, **config})
    server = BackgroundServer(lambda: make_app(batcher, rewarder, cfg))
    server.batcher = batcher
    return server


@pytest.fixture(scope="module")
def server(tiny_prm, toy_tokenizer, mesh):
    scorer = new_scorer(tiny_prm, toy_tokenizer, mesh)
    assert warm_up(scorer) == len(scorer.rules.shapes())  # every shape a batch may take, compiled up front
    with serve(scorer) as s:
        yield s
    assert scorer.shapes_used == scorer.rules.shapes()  # serving compiled nothing more


def ids_of(tok, k):
    problem, steps = item(k)
    return encode_prm(tok, problem, steps, tok.convert_tokens_to_ids("<extra_0>"))


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def test_pooling_token_ids_equal_offline_eval_scores(server, toy_tokenizer, offline):
    ks = list(range(7))
    ref = offline([item(k) for k in ks])
    r = post(server, "/pooling", {"model": NAME, "task": "token_classify",
                                  "input": [ids_of(toy_tokenizer, k) for k in ks]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME and body["id"].startswith("pool-")
    assert body["usage"]["prompt_tokens"] == sum(len(ids_of(toy_tokenizer, k)) for k in ks)
    assert [d["index"] for d in body["data"]] == ks and {d["object"] for d in body["data"]} == {"pooling"}
    for d, want in zip(body["data"], ref):
        got = np.asarray(d["data"])
        assert got.shape == (len(want), 2)  # one [p_wrong, p_right] per step token
        np.testing.assert_allclose(got[:, 1], want, atol=1e-5)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    assert np.ptp(np.concatenate(ref)) > 0.1  # the scores differ, so a mix-up would show
    # a single id list (not nested) is one input, as in vLLM
    one = post(server, "/pooling", {"input": ids_of(toy_tokenizer, 3)}).json()
    np.testing.assert_allclose(np.asarray(one["data"][0]["data"])[:, 1], ref[3], atol=1e-5)


def test_pooling_text_and_messages_equal_an_eager_forward(server, tiny_prm, toy_tokenizer):
    tok = toy_tokenizer
    problem, steps = item(2)
    messages = [{"role": "system", "content": "Please reason."}, {"role": "user", "content": problem},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    for body, ids in (({"input": text}, tok.encode(text)),
                      ({"messages": messages}, tok.encode(text, add_special_tokens=False))):
        want = step_rewards(tiny_prm(jnp.asarray([ids])), [ids], tok.convert_tokens_to_ids("<extra_0>"))[0]
        r = post(server, "/pooling", body)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["data"][0]["data"])
        assert len(want) == len(steps)
        np.testing.assert_allclose(got[:, 1], want, atol=1e-5)


def chatml_prompt(tok, problem):
    return tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)


def test_get_reward_in_openrlhfs_contract(server, toy_tokenizer, offline):
    tok = toy_tokenizer
    prompts, queries, ks = [], [], [0, 3, 4]
    for k in ks:
        problem, steps = item(k)
        prompts.append(chatml_prompt(tok, problem))
        queries.append(prompts[-1] + "\n\n".join(steps) + "<|im_end|>")  # decoded with special tokens kept
    prompts.append(chatml_prompt(tok, PROBLEMS[0]))
    queries.append(prompts[-1] + "  <|im_end|><|endoftext|>")  # an empty response
    ref = offline([item(k) for k in ks])
    r = post(server, "/get_reward", {"query": queries, "prompts": prompts, "labels": ["15", "53", "28", "15"]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = [min(s) for s in ref] + [0.0]
    np.testing.assert_allclose(body["rewards"], want, atol=1e-5)
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"]["prm_n_steps"] == [len(item(k)[1]) for k in ks] + [0]
    np.testing.assert_allclose(body["extra_logs"]["prm_min_step"], want, atol=1e-5)
    # without prompts the response starts after the last ChatML assistant turn
    alone = post(server, "/get_reward", {"query": queries[:1]}).json()
    np.testing.assert_allclose(alone["rewards"], want[:1], atol=1e-5)


def test_64_concurrent_clients_get_exactly_their_own_answers(server, toy_tokenizer, offline):
    n_items, clients, per_client = 64, 64, 20
    ids = [ids_of(toy_tokenizer, k) for k in range(n_items)]
    ref = offline([item(k) for k in range(n_items)])
    batches_before = server.batcher.batches

    async def client(c, session):
        out = []
        for j in range(per_client):
            k = (c * 7 + j) % n_items
            async with session.post(server.url + "/pooling", json={"input": ids[k]}) as r:
                assert r.status == 200, await r.text()
                out.append((k, (await r.json())["data"][0]["data"]))
        return out

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
            return await asyncio.gather(*(client(c, session) for c in range(clients)))

    t0 = time.perf_counter()
    answers = asyncio.run(asyncio.wait_for(main(), timeout=120))
    elapsed = time.perf_counter() - t0
    for per in answers:
        for k, data in per:
            np.testing.assert_allclose(np.asarray(data)[:, 1], ref[k], atol=1e-5)
    batches = server.batcher.batches - batches_before
    assert batches < clients * per_client / 4, batches  # requests were batched together
    print(f"{clients * per_client} requests in {elapsed:.1f} s, {batches} batches")


def test_bad_input_answers_400_or_413_naming_the_field(server, toy_tokenizer):
    tok = toy_tokenizer
    good = ids_of(tok, 1)
    cases = [
        (b"{not json", "/pooling", 400, "body"),
        (b"[1, 2]", "/pooling", 400, "body"),
        ({"inputs": good}, "/pooling", 400, "input"),
        ({"input": []}, "/pooling", 400, "input"),
        ({"input": [good, "no step token here"]}, "/pooling", 400, "input[1]"),
        ({"input": [good, good * 3]}, "/pooling", 400, "input[1]"),  # over max_length
        ({"input": [good[:-1] + [10 ** 6]]}, "/pooling", 400, "input[0]"),
        ({"input": [[1.5, 3]]}, "/pooling", 400, "input[0]"),
        ({"input": good, "task": "embed"}, "/pooling", 400, "task"),
        ({"input": good, "model": "other"}, "/pooling", 404, "model"),
        ({"messages": "hi"}, "/pooling", 400, "messages"),
        ({"prompts": ["a"]}, "/get_reward", 400, "query"),
        ({"query": ["a", "b"], "prompts": ["a"]}, "/get_reward", 400, "prompts"),
        ({"query": ["no chat turn"]}, "/get_reward", 400, "query[0]"),
        ({"query": [chatml_prompt(tok, "x") + "\n\n".join(["3 + 12 = 15"] * 60)]}, "/get_reward", 400, "query[0]"),
        (b"x" * (2 << 20), "/pooling", 413, "body"),
    ]
    for body, path, status, param in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + path, timeout=60, **kw)
        assert r.status_code == status, (body if len(str(body)) < 200 else param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == status and err["message"].startswith(param), err
    assert "maximum context length is 256" in post(server, "/pooling", {"input": [good * 3]}).json()["error"]["message"]
    r = httpx.get(server.url + "/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert post(server, "/pooling", {"input": good}).status_code == 200  # still serving


def test_health_and_models(server):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["max_model_len"] == MAX_LEN


class BlockingScorer(EncodedScorer):
    """Holds the scoring thread inside a batch until released, so the queue fills deterministically."""
    entered: threading.Event
    release: threading.Event

    def score(self, items, progress=None):
        self.entered.set()
        assert self.release.wait(60)
        return super().score(items, progress)


def test_full_queue_answers_503_then_the_held_requests_finish(tiny_prm, toy_tokenizer, mesh, offline):
    scorer = new_scorer(tiny_prm, toy_tokenizer, mesh, BlockingScorer)
    scorer.entered, scorer.release = threading.Event(), threading.Event()
    ids = [ids_of(toy_tokenizer, k) for k in range(3)]
    ref = offline([item(k) for k in range(3)])
    with serve(scorer, BatchConfig(max_batch_tokens=1, max_wait_ms=0, max_queue=1)) as s:
        results = {}

        def send(k):
            results[k] = post(s, "/pooling", {"input": ids[k]})

        first = threading.Thread(target=send, args=(0,))
        first.start()
        assert scorer.entered.wait(30)  # request 0 is in the scoring thread; the queue is empty
        second = threading.Thread(target=send, args=(1,))
        second.start()
        deadline = time.monotonic() + 30
        while s.batcher.queued() < 1:  # request 1 waits in the queue, which is now full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = post(s, "/pooling", {"input": ids[2]})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["param"] == "queue"
        scorer.release.set()
        first.join(60)
        second.join(60)
        for k in (0, 1):
            assert results[k].status_code == 200
            np.testing.assert_allclose(np.asarray(results[k].json()["data"][0]["data"])[:, 1], ref[k], atol=1e-5)


def test_bearer_token(tiny_prm, toy_tokenizer, mesh):
    with serve(new_scorer(tiny_prm, toy_tokenizer, mesh), api_key="s3cret") as s:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        r = httpx.get(s.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
        ok = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200


def test_clients_that_disconnect_mid_request_do_not_break_the_batch(server, toy_tokenizer, offline):
    ids = [ids_of(toy_tokenizer, k) for k in range(8)]
    ref = offline([item(k) for k in range(8)])
    port = server.port

    def raw(body: bytes, send: int):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /pooling HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:send])
        # closed: half a body, or a whole request whose answer nobody reads

    async def good(session, k):
        async with session.post(server.url + "/pooling", json={"input": ids[k]}) as r:
            return k, r.status, (await r.json())["data"][0]["data"]

    async def main():
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(good(session, k)) for k in range(8)]
            for k in range(8):
                body = json.dumps({"input": ids[k]}).encode()
                await asyncio.to_thread(raw, body, len(body) // 2 if k % 2 else len(body))
            return await asyncio.gather(*tasks)

    for k, status, data in asyncio.run(asyncio.wait_for(main(), timeout=60)):
        assert status == 200
        np.testing.assert_allclose(np.asarray(data)[:, 1], ref[k], atol=1e-5)
    time.sleep(0.2)  # let the abandoned requests finish in the scoring thread
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = post(server, "/pooling", {"input": ids[5]})
    np.testing.assert_allclose(np.asarray(r.json()["data"][0]["data"])[:, 1], ref[5], atol=1e-5)


def test_cli_serve_binds_loopback_and_answers(tiny_prm, toy_tokenizer_dir, tmp_path, toy_tokenizer, offline):
    """`prm-jax serve` as a user starts it: a child process on a free port, stopped with SIGTERM."""
    from prm_jax.models.hf import save_hf

    save_hf(tiny_prm, tmp_path / "prm", tokenizer_dir=toy_tokenizer_dir)
    env = {**os.environ, "XLA_FLAGS": "", "PRM_JAX_HUGEPAGES": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "prm_jax.cli", "serve", "--prm", str(tmp_path / "prm"),
                             "--port", "0", "--max-length", str(MAX_LEN), "--batch-size", "8",
                             "--max-batch-tokens", "2048", "--served-model-name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the port is bound
        assert "on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        r = httpx.post(url + "/pooling", json={"input": ids_of(toy_tokenizer, 6)}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["data"][0]["data"])[:, 1], offline([item(6)])[0], atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
