"""`prm-jax serve`: a PRM behind the HTTP APIs that RL frameworks already call (aiohttp).

- `POST /pooling`, as vLLM answers it for `Qwen2ForProcessRewardModel` (task token_classify): the
  request's `input` (a text, texts, token ids, or lists of them) or chat `messages` is tokenized as
  is, and each input answers `[p_wrong, p_right]` at every step token, in vLLM's `PoolingResponse`
  shape (`{"id", "object": "list", "created", "model", "data": [{"index", "object": "pooling",
  "data"}], "usage"}`). As in vLLM, the step tokens are in the text already (the client formats it).
- `POST /get_reward`, OpenRLHF's remote reward model: `{"query": [prompt+response texts], "prompts":
  [...], "labels": [...]}` -> `{"rewards", "scores", "extra_logs"}`; each response is split into steps
  and scored with the PRM's own chat format (prm_jax.rewards.StepReward), one aggregate per query.
- `GET /health`, `GET /v1/models`.

Errors answer in vLLM's shape, `{"error": {"message", "type", "param", "code"}}`, naming the field:
400 bad input, 401 a missing or wrong bearer token, 404 an unknown model or path, 413 a body over the
limit, 503 a full queue (with Retry-After), 500 anything else. A handler never lets an exception
escape, and the scoring thread survives a failed batch, so no request can stop the server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from prm_jax.errors import InputError
from prm_jax.evaluation.scoring import Encoded
from prm_jax.rewards import StepReward, problem_of_prompt
from prm_jax.serving.batcher import Batcher, QueueFull

log = logging.getLogger(__name__)

ASSISTANT_TURN = "<|im_start|>assistant\n"  # ChatML: where a response starts when no prompt is given


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str  # what /v1/models lists and `model` in a request must name (vLLM: the model path)
    api_key: str | None = None  # when set, every path but /health needs `Authorization: Bearer <key>`
    max_body_bytes: int = 32 << 20
    vocab_size: int | None = None  # token ids in a request must be below it (default: the tokenizer's size)


class BadField(InputError):
    """Bad input in one field of a request body."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(f"{param}: {message}")
        self.param, self.status = param, status


def error_body(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLarge",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status, headers={"Retry-After": "1"} if status == 503 else None)


class PRMService:
    """The handlers, over one batcher (the scoring thread) and the encoding settings of its scorer."""

    def __init__(self, batcher: Batcher, rewarder: StepReward, config: ServeConfig):
        self.batcher, self.rewarder, self.config = batcher, rewarder, config
        self.scorer = batcher.scorer
        self.tokenizer = self.scorer.tokenizer
        self.vocab_size = config.vocab_size or len(self.tokenizer)
        self.created = int(time.time())

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    async def _body(request: web.Request) -> dict:
        raw = await request.read()  # 413 past client_max_size
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadField("body", f"invalid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadField("body", f"expected a JSON object, got {type(body).__name__}")
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise BadField("model", f"the model `{model}` does not exist (serving `{self.config.model_name}`)", 404)

    def _encoded_ids(self, ids: list[int], where: str) -> Encoded:
        if len(ids) > self.scorer.max_length:
            raise BadField(where, f"this model's maximum context length is {self.scorer.max_length} tokens; "
                                  f"the input has {len(ids)}")
        positions = tuple(i for i, t in enumerate(ids) if t == self.scorer.step_token_id)
        if not positions:
            token = self.tokenizer.convert_ids_to_tokens(self.scorer.step_token_id)
            raise BadField(where, f"no step token {token!r} (id {self.scorer.step_token_id}); expected one after "
                                  "every step, where the PRM reads a step's reward")
        return Encoded(tuple(ids), positions, len(positions))

    def _pooling_inputs(self, body: dict) -> list[Encoded]:
        """The request's inputs as token ids, as vLLM's completion or chat pooling request reads them."""
        if "messages" in body:
            msgs = body["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise BadField("messages", "expected a non-empty list of {\"role\": str, \"content\": str}")
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=bool(body.get("add_generation_prompt")))
            ids = self.tokenizer.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))
            return [self._encoded_ids(ids, "messages")]
        if "input" not in body:
            raise BadField("input", "missing; expected a text, a list of texts, token ids, or a list of token id lists")
        x = body["input"]
        special = bool(body.get("add_special_tokens", True))
        if isinstance(x, str) or (isinstance(x, list) and x and all(isinstance(t, int) for t in x)):
            x = [x]
        if not isinstance(x, list) or not x:
            raise BadField("input", "expected a text, a non-empty list of texts, token ids, or a list of token id lists")
        out = []
        for i, item in enumerate(x):
            where = f"input[{i}]"
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=special)
            elif isinstance(item, list) and item and all(type(t) is int for t in item):
                bad = next((t for t in item if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise BadField(where, f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
                ids = item
            else:
                raise BadField(where, "expected a text or a non-empty list of token ids (ints)")
            out.append(self._encoded_ids(list(ids), where))
        return out

    async def _score(self, encoded: list[Encoded]) -> list[list[float]]:
        try:
            return await self.batcher.submit(encoded)
        except QueueFull as e:
            raise BadField("queue", f"server busy: {e}; retry later", 503) from None

    # -- handlers --------------------------------------------------------------------------------
    async def pooling(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_model(body)
        task = body.get("task")
        if task not in (None, "token_classify"):
            raise BadField("task", f"unsupported task {task!r}; this PRM serves 'token_classify'")
        if body.get("encoding_format", "float") != "float":
            raise BadField("encoding_format", f"unsupported {body['encoding_format']!r}; expected 'float'")
        if body.get("truncate_prompt_tokens") is not None:
            raise BadField("truncate_prompt_tokens", "not supported: a cut text loses its later steps' rewards")
        encoded = self._pooling_inputs(body)
        rows = await self._score(encoded)
        tokens = sum(len(e.ids) for e in encoded)
        return web.json_response({
            "id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": self.config.model_name,
            "data": [{"index": i, "object": "pooling", "data": [[1.0 - p, p] for p in row]}
                     for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}})

    def _split_query(self, query: str, prompt: str | None, i: int) -> tuple[str, str]:
        """(problem, response) of one OpenRLHF query (prompt + response as decoded by the policy)."""
        if prompt is not None and query.startswith(prompt):
            return problem_of_prompt(prompt), query[len(prompt):]
        cut = query.rfind(ASSISTANT_TURN)
        if cut >= 0:
            head = query[:cut]
            return problem_of_prompt(prompt if prompt is not None else head), query[cut + len(ASSISTANT_TURN):]
        if prompt is None:
            raise BadField(f"query[{i}]", "no prompts given and no ChatML assistant turn in the query; expected "
                                          "`prompts` (each query's prompt prefix)")
        raise BadField(f"query[{i}]", f"does not start with prompts[{i}] and has no ChatML assistant turn")

    async def get_reward(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        queries, prompts = body.get("query"), body.get("prompts")
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
            raise BadField("query", "expected a non-empty list of texts (prompt + response)")
        if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(queries)
                                    or not all(isinstance(p, str) for p in prompts)):
            raise BadField("prompts", f"expected a list of {len(queries)} texts, one per query")
        steps_of, encoded, which = [], [], []
        for i, q in enumerate(queries):
            problem, response = self._split_query(q, prompts[i] if prompts is not None else None, i)
            steps = self.rewarder.steps_of(response)
            steps_of.append(steps)
            if steps:
                try:
                    encoded.append(self.rewarder.check(problem, steps, f"query[{i}]"))
                except InputError as e:
                    raise BadField(f"query[{i}]", str(e).split(": ", 1)[-1]) from None
                which.append(i)
        step_scores: list[list[float]] = [[] for _ in queries]
        if encoded:
            for i, row in zip(which, await self._score(encoded)):
                step_scores[i] = row
        rewards = [self.rewarder.reward(s) for s in step_scores]
        return web.json_response({"rewards": rewards, "scores": rewards, "extra_logs": {
            "prm_n_steps": [len(s) for s in steps_of],
            "prm_min_step": [min(s) if s else self.rewarder.empty_reward for s in step_scores]}})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "prm_jax",
            "root": self.config.model_name, "parent": None, "max_model_len": self.scorer.max_length,
            "permission": []}]})


def _middleware(config: ServeConfig):
    @web.middleware
    async def guard(request: web.Request, handler):
        if config.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error_body(401, "missing or wrong bearer token (Authorization: Bearer <key>)", "Authorization")
        try:
            return await handler(request)
        except BadField as e:
            return error_body(e.status, str(e), e.param)
        except web.HTTPRequestEntityTooLarge:
            return error_body(413, f"body: over the limit of {config.max_body_bytes} bytes", "body")
        except web.HTTPException as e:
            if e.status >= 400:
                return error_body(e.status, f"{request.method} {request.path}: {e.reason}")
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- a request must never take the server down
            log.exception("%s %s failed", request.method, request.path)
            return error_body(500, f"{type(e).__name__}: {e}")

    return guard


def make_app(batcher: Batcher, rewarder: StepReward, config: ServeConfig) -> web.Application:
    """The aiohttp application; closing it (runner cleanup) stops the batcher's thread."""
    service = PRMService(batcher, rewarder, config)
    app = web.Application(middlewares=[_middleware(config)], client_max_size=config.max_body_bytes)
    app.router.add_post("/pooling", service.pooling)
    app.router.add_post("/get_reward", service.get_reward)
    app.router.add_get("/health", service.health)
    app.router.add_get("/v1/models", service.models)

    async def stop_batcher(_app):
        await asyncio.to_thread(batcher.close)

    app.on_cleanup.append(stop_batcher)
    return app


class BackgroundServer:
    """An app served on host:port by an event loop in a thread (tests, benchmarks, embedding);
    port 0 takes a free port, read back from `.port`. A context manager."""

    def __init__(self, app_factory: Callable[[], web.Application], host: str = "127.0.0.1", port: int = 0):
        self._factory, self.host, self.port = app_factory, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="prm-serve", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self._factory(), handle_signals=False)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 -- reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
