"""Clients that turn judge prompts (chat messages) into replies.

- `SGLangClient`: SGLang's native API. The chat template is applied here, from the judge's own
  tokenizer directory, and the text goes to `POST /generate` (`{"text": str | [str],
  "sampling_params": {...}}`); several prompts can share one request. `GET /health` and
  `GET /get_model_info` are checked at start.
- `OpenAIClient`: `POST /v1/chat/completions` on any OpenAI-compatible server (SGLang, vLLM, ...).
- `LocalClient`: no server; the prompt runs through an in-process generate function (`prm-jax judge
  --api local` gives it prm_jax's JAX sampler on a local HF chat model: the TPU path).

Requests go through one aiohttp session with a pool of `concurrency` keep-alive connections
(http:// or https://). Each has a timeout and is retried with exponential backoff and jitter on
connection errors, timeouts, 5xx, 408, 429 (Retry-After is honoured) and malformed bodies; other
4xx fail at once. An optional rate cap spaces request starts.

Serving a judge with SGLang (GPU host, `pip install prm_jax[sglang]`):

    python -m sglang.launch_server --model-path Qwen/Qwen2.5-72B-Instruct --tp 8 --port 30000
    prm-jax judge --api sglang --endpoint http://127.0.0.1:30000 --tokenizer /path/to/Qwen2.5-72B-Instruct \
        --solutions solutions.jsonl --out judged.jsonl --concurrency 128 --batch-size 4
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import random
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from prm_jax.errors import RunError

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1          # -1 = off (SGLang's convention)
    seed: int = 0            # used by the local backend only

    def as_dict(self) -> dict[str, Any]:
        """What identifies the sampling in the reply cache (the seed only matters locally)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    base_delay: float = 0.25
    max_delay: float = 30.0
    max_retry_after: float = 600.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Exponential backoff with jitter (uniform in [d/2, d]); never shorter than Retry-After."""
        d = min(self.max_delay, self.base_delay * (2 ** attempt))
        d = d / 2 + rng.uniform(0, d / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d


@dataclasses.dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    failures: int = 0        # requests given up after the last retry (or a non-retryable error)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def add_tokens(self, replies: Sequence["Reply"]) -> None:
        for r in replies:
            self.prompt_tokens += r.prompt_tokens
            self.completion_tokens += r.completion_tokens


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RetryableError(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class JudgeRequestError(RunError):
    """A request that failed for good (retries exhausted or a non-retryable status)."""


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (one event loop, so no lock)."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi
        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


@dataclasses.dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class HTTPClient:
    """Shared HTTP machinery: one aiohttp session whose pool holds `concurrency` keep-alive
    connections, a semaphore bounding the requests in flight, a rate cap, retries and counters."""

    def __init__(self, endpoint: str, model: str, sampling: SamplingParams, *, concurrency: int = 16,
                 timeout: float = 300.0, retry: RetryPolicy = RetryPolicy(), max_rps: float | None = None,
                 api_key: str | None = None, seed: int = 0):
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.sampling = sampling
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry
        self.counters = Counters()
        self.limiter = RateLimiter(max_rps)
        self.rng = random.Random(seed)
        self.sleep = asyncio.sleep  # tests swap this to observe backoff delays
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None  # made in the running event loop
        self._slots: asyncio.Semaphore | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls = _tls_context() if self.endpoint.startswith("https:") else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency, ssl=tls),
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self.headers)
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._session

    async def request(self, method: str, path: str, body: bytes | None = None) -> HTTPResponse:
        """One request; a timeout or a connection failure raises RetryableError."""
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self._open().request(method, self.endpoint + path, data=body, headers=headers) as resp:
                content = await resp.read()
        except TimeoutError:
            raise RetryableError("timeout", f"{path}: timed out after {self.timeout} s") from None
        except aiohttp.ClientError as e:
            raise RetryableError("connection", f"{path}: {type(e).__name__}: {e}") from None
        return HTTPResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, content)

    def sampling_dict(self) -> dict[str, Any]:
        return self.sampling.as_dict()

    async def start(self) -> None:
        """Check the server before sending work (subclasses)."""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self):
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def complete(self, prompts: Sequence[Messages]) -> list[Reply]:
        self._open()
        async with self._slots:
            return await self._with_retries(prompts)

    async def _with_retries(self, prompts: Sequence[Messages]) -> list[Reply]:
        last: RetryableError | None = None
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                self.counters.retries += 1
                await self.sleep(self.retry.delay(attempt - 1, last.retry_after, self.rng))
            await self.limiter.wait()
            self.counters.requests += 1
            try:
                replies = await self._send(prompts)
            except RetryableError as e:
                self.counters.error(e.kind)
                last = e
                continue
            except JudgeRequestError:
                self.counters.error("fatal")
                self.counters.failures += 1
                raise
            self.counters.add_tokens(replies)
            return replies
        self.counters.failures += 1
        raise JudgeRequestError(f"gave up after {self.retry.max_retries + 1} attempts; last error: {last}")

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        """POST JSON and return the decoded body, mapping every failure to Retryable or fatal."""
        resp = await self.request("POST", path, json.dumps(payload).encode("utf-8"))
        status = resp.status
        if status == 429 or status == 408 or status >= 500:
            raise RetryableError(f"http_{status}", f"{path}: HTTP {status}",
                                 parse_retry_after(resp.headers.get("retry-after")))
        if status >= 400:
            raise JudgeRequestError(f"{path}: HTTP {status}: {resp.content[:300]!r}")
        try:
            return json.loads(resp.content)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetryableError("malformed", f"{path}: body is not JSON ({e})") from None

    async def _get(self, path: str) -> HTTPResponse:
        try:
            return await self.request("GET", path)
        except RetryableError as e:
            raise JudgeRequestError(f"cannot reach {self.endpoint}{path}: {e}") from None

    async def _send(self, prompts: Sequence[Messages]) -> list[Reply]:
        raise NotImplementedError


def _malformed(path: str, what: str) -> RetryableError:
    return RetryableError("malformed", f"{path}: unexpected reply shape ({what})")


class OpenAIClient(HTTPClient):
    """`POST /v1/chat/completions`, one prompt per request."""

    async def start(self) -> None:
        resp = await self._get("/v1/models")
        if resp.status != 200:
            raise JudgeRequestError(f"{self.endpoint}/v1/models answered HTTP {resp.status}")

    async def _send(self, prompts: Sequence[Messages]) -> list[Reply]:
        return list(await asyncio.gather(*(self._one(p) for p in prompts)))

    async def _one(self, messages: Messages) -> Reply:
        s = self.sampling
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens,
                                   "temperature": s.temperature, "top_p": s.top_p}
        if s.top_k > 0:  # not in OpenAI's schema; SGLang and vLLM accept it
            payload["top_k"] = s.top_k
        path = "/v1/chat/completions"
        body = await self._post(path, payload)
        try:
            text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _malformed(path, "no choices[0].message.content") from None
        if not isinstance(text, str):
            raise _malformed(path, "content is not a string")
        usage = body.get("usage") or {}
        return Reply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class SGLangClient(HTTPClient):
    """SGLang's native `POST /generate`; the chat template comes from the judge's tokenizer."""

    def __init__(self, endpoint: str, model: str, sampling: SamplingParams, *, tokenizer, **kw):
        super().__init__(endpoint, model, sampling, **kw)
        self.tokenizer = tokenizer
        self.model_info: dict[str, Any] = {}

    async def start(self) -> None:
        resp = await self._get("/health")
        if resp.status != 200:
            raise JudgeRequestError(f"{self.endpoint}/health answered HTTP {resp.status}")
        resp = await self._get("/get_model_info")
        try:
            self.model_info = resp.json()
            if not isinstance(self.model_info, dict):
                raise json.JSONDecodeError("not an object", "", 0)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeRequestError(f"{self.endpoint}/get_model_info did not return JSON") from None
        if self.model_info.get("is_generation") is False:
            raise JudgeRequestError(f"{self.endpoint} serves a non-generation model: {self.model_info}")

    def chat_text(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def _send(self, prompts: Sequence[Messages]) -> list[Reply]:
        s = self.sampling
        texts = [self.chat_text(m) for m in prompts]
        params = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                  "top_k": s.top_k}
        payload = {"text": texts if len(texts) > 1 else texts[0], "sampling_params": params}
        path = "/generate"
        body = await self._post(path, payload)
        # SGLang answers a batch with a list of {"text", "meta_info"}; also accept one object with a list of texts.
        items = body if isinstance(body, list) else [body]
        if isinstance(body, dict) and isinstance(body.get("text"), list):
            items = [{"text": t} for t in body["text"]]
        if len(items) != len(texts):
            raise _malformed(path, f"{len(items)} outputs for {len(texts)} prompts")
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise _malformed(path, "an output without a 'text' string")
            meta = item.get("meta_info") or {}
            out.append(Reply(item["text"], int(meta.get("prompt_tokens") or 0),
                             int(meta.get("completion_tokens") or 0)))
        return out


class LocalClient:
    """Judge prompts through an in-process `generate(prompt_ids) -> new token ids per prompt` (the
    TPU path: no server; `prm-jax judge --api local` passes the JAX sampler on a local model).
    Stop tokens in a reply (`stop_ids`) are dropped before decoding.

    Generation runs in a worker thread, one batch at a time, so the event loop stays free."""

    def __init__(self, generate: Callable[[list[list[int]]], Sequence[Sequence[int]]], tokenizer,
                 sampling: SamplingParams, *, model_name: str, stop_ids: Sequence[int] = ()):
        self.generate = generate
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.model_name = model_name
        self.stop_ids = frozenset(stop_ids)
        self.concurrency = 1
        self.counters = Counters()
        self._lock = asyncio.Lock()

    def sampling_dict(self) -> dict[str, Any]:
        return self.sampling.as_dict()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def _generate(self, prompts: Sequence[Messages]) -> list[Reply]:
        ids = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False) for m in prompts]
        outs = self.generate(ids)
        replies = []
        for p, o in zip(ids, _token_lists(outs, len(ids))):
            o = [t for t in o if t not in self.stop_ids]
            replies.append(Reply(self.tokenizer.decode(o, skip_special_tokens=True), len(p), len(o)))
        return replies

    async def complete(self, prompts: Sequence[Messages]) -> list[Reply]:
        async with self._lock:
            self.counters.requests += 1
            try:
                replies = await asyncio.to_thread(self._generate, prompts)
            except Exception:
                self.counters.failures += 1
                raise
        self.counters.add_tokens(replies)
        return replies


def _token_lists(outs, n: int) -> list[list[int]]:
    """The sampler's new-token lists (one per prompt), checked."""
    rows = [list(map(int, o)) for o in outs]
    if len(rows) != n:
        raise RuntimeError(f"generate returned {len(rows)} sequences for {n} prompts")
    return rows
