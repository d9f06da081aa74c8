"""A loopback HTTP server that plays an LLM judge, for tests and the judge benchmark.

It speaks SGLang's native API (`GET /health`, `GET /get_model_info`, `POST /generate`, batched
text lists answered with a list of {"text", "meta_info"}) and the OpenAI chat API
(`GET /v1/models`, `POST /v1/chat/completions`). Replies come from a script (a function of the
prompt text); faults can be injected at a rate or by plan:

    500        HTTP 500
    429        HTTP 429 with a Retry-After header
    slow       answer only after `slow_s` seconds (a timeout when the client's timeout is shorter)
    truncated  HTTP 200 whose JSON body is cut in half (Content-Length matches)
    disconnect headers promise a body, half of it is sent, then the connection is closed
    badshape   HTTP 200 with valid JSON of the wrong shape
    garbage    HTTP 200 with a well-formed reply whose text has no readable verdict
    chunked    (not a fault) a good reply sent with Transfer-Encoding: chunked
    close      (not a fault) a good reply, then the connection is closed without notice, as an
               idle keep-alive timeout would; the client's next request on it must reconnect

It binds 127.0.0.1 on an ephemeral port, runs its own asyncio loop (in a thread, or as a process:
`python tests/judge_fixture.py --latency 0.05 --fault-rate 0.01` prints `PORT <n>`), and every
loop in it is bounded by the connection or by a timeout.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import threading
from collections.abc import Callable

FAULT_KINDS = ("500", "429", "slow", "truncated", "disconnect", "badshape", "garbage", "chunked", "close")
GARBAGE_REPLY = "I have looked at the solution. It is hard to say; some parts look fine and others less so."
_MARKER = re.compile(r"\[first_error=(-?\d+)\]")
_PARAGRAPH = re.compile(r"<paragraph_(\d+)>")


def conclusion_reply(first_error: int, n_steps: int, base: int = 1) -> str:
    """A realistic per-paragraph critique that stops at `first_error` (0-based, -1 = none)."""
    last = n_steps - 1 if first_error < 0 else first_error
    parts = []
    for i in range(last + 1):
        k = i + base
        verdict = "This paragraph is incorrect: the computation does not match." if i == first_error \
            else "The computation checks out and follows from the problem, so this paragraph is correct."
        parts.append(f"<analysis_{k}>\nParagraph {k} states a step. {verdict}\n</analysis_{k}>")
    parts.append("<conclusion>Incorrect</conclusion>" if first_error >= 0 else "<conclusion>Correct</conclusion>")
    return "\n\n".join(parts)


def marker_script(prompt: str) -> str:
    """Default script: the prompt carries `[first_error=K]` (0-based, -1 = none) in its problem;
    the reply is a conclusion-style critique naming that step, numbered as the prompt numbers it.
    Without a marker the reply has no verdict."""
    m = _MARKER.search(prompt)
    if not m:
        return GARBAGE_REPLY
    numbers = [int(x) for x in _PARAGRAPH.findall(prompt)]
    base = min(numbers) if numbers else 1
    n_steps = len(set(numbers)) or 1
    return conclusion_reply(int(m.group(1)), n_steps, base)


class JudgeFixture:
    def __init__(self, script: Callable[[str], str] = marker_script, *, latency_s: float = 0.0,
                 fault_rate: float = 0.0, fault_kinds: tuple[str, ...] = ("500", "429", "truncated", "disconnect"),
                 fault_plan: dict[str, list[str]] | None = None, slow_s: float = 1.0, retry_after: str = "0",
                 seed: int = 0, model: str = "fixture-judge"):
        unknown = set(fault_kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {FAULT_KINDS}")
        self.script = script
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        # marker substring -> faults to inject, in order, on the requests whose prompt contains it
        self.fault_plan = {k: list(v) for k, v in (fault_plan or {}).items()}
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.model = model
        self.rng = random.Random(seed)
        self.counts: collections.Counter = collections.Counter()  # "requests", "ok", "fault:<kind>", path
        self.prompts_served: collections.Counter = collections.Counter()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "JudgeFixture":
        self._thread = threading.Thread(target=self._run, name="judge-fixture", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("judge fixture did not start within 10 s")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # handlers close their sockets
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> "JudgeFixture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one iteration per request, ends when the client closes
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                        ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in
                           (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._respond(method, path, body, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # shutdown; ending normally keeps Python 3.11's stream callback from logging it
        finally:
            writer.close()

    @staticmethod
    async def _send(writer, status: int, payload: bytes, extra: dict[str, str] | None = None,
                    content_length: int | None = None, chunked: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "X")
        hdr = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
        if chunked:
            hdr.append("Transfer-Encoding: chunked")
            step = max(1, len(payload) // 3)
            pieces = [payload[i: i + step] for i in range(0, len(payload), step)]
            payload = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        else:
            hdr.append(f"Content-Length: {len(payload) if content_length is None else content_length}")
        hdr += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()

    def _pick_fault(self, prompt: str) -> str | None:
        for marker, plan in self.fault_plan.items():
            if plan and marker in prompt:
                return plan.pop(0)
        if self.fault_rate and self.rng.random() < self.fault_rate:
            return self.rng.choice(self.fault_kinds)
        return None

    async def _respond(self, method: str, path: str, body: bytes, writer) -> bool:
        self.counts[path] += 1
        if method == "GET":
            if path == "/health":
                await self._send(writer, 200, b"")
            elif path == "/get_model_info":
                info = {"model_path": self.model, "tokenizer_path": self.model, "is_generation": True}
                await self._send(writer, 200, json.dumps(info).encode())
            elif path == "/v1/models":
                await self._send(writer, 200, json.dumps(
                    {"object": "list", "data": [{"id": self.model, "object": "model"}]}).encode())
            else:
                await self._send(writer, 404, b'{"error": "not found"}')
            return True
        req = json.loads(body)
        if path == "/generate":
            texts = req["text"] if isinstance(req["text"], list) else [req["text"]]
        elif path == "/v1/chat/completions":
            texts = [req["messages"][-1]["content"]]
        else:
            await self._send(writer, 404, b'{"error": "not found"}')
            return True
        self.counts["requests"] += 1
        fault = self._pick_fault("\n".join(texts))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None:
            self.counts[f"fault:{fault}"] += 1
        if fault == "500":
            await self._send(writer, 500, b'{"error": "injected server error"}')
            return True
        if fault == "429":
            await self._send(writer, 429, b'{"error": "rate limited"}', {"Retry-After": self.retry_after})
            return True
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        replies = [GARBAGE_REPLY if fault == "garbage" else self.script(t) for t in texts]
        if path == "/generate":
            outs = [{"text": r, "meta_info": {"prompt_tokens": len(t.split()), "completion_tokens": len(r.split()),
                                              "finish_reason": {"type": "stop"}}} for t, r in zip(texts, replies)]
            payload = outs if isinstance(req["text"], list) else outs[0]
        else:
            payload = {"id": "chatcmpl-fixture", "object": "chat.completion", "model": req.get("model", self.model),
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": replies[0]},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": len(texts[0].split()), "completion_tokens": len(replies[0].split())}}
        if fault == "badshape":
            payload = {"unexpected": "shape"}
        data = json.dumps(payload).encode()
        if fault == "truncated":
            data = data[: len(data) // 2]
        if fault == "disconnect":
            await self._send(writer, 200, data[: len(data) // 2], content_length=len(data))
            return False
        await self._send(writer, 200, data, chunked=(fault == "chunked"))
        if fault in (None, "chunked", "close"):
            self.counts["ok"] += 1
        for t in texts:
            self.prompts_served[t] += 1
        return fault != "close"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Loopback judge server (SGLang native + OpenAI chat)")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--fault-kinds", default="500,429,truncated,disconnect")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        import uvloop  # optional: a faster event loop when installed
        uvloop.install()
    except ImportError:
        pass
    fx = JudgeFixture(latency_s=args.latency, fault_rate=args.fault_rate,
                      fault_kinds=tuple(args.fault_kinds.split(",")), seed=args.seed).start()
    print(f"PORT {fx.port}", flush=True)
    import time
    try:
        sys.stdin.read()  # runs until stdin closes (the parent exits or closes the pipe)
    finally:
        fx.stop()
    n = fx.counts["requests"]
    print(f"fixture: {n} requests, {1000 * time.process_time() / max(n, 1):.3f} ms CPU per request", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
