"""`prm-jax serve`."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.errors import InputError
from prm_jax.flags import model_dir, nonneg_float, nonneg_int, positive_int
from prm_jax.models.runtime import DTYPES
from prm_jax.parallel.mesh import add_distributed_flags
from prm_jax.rewards import AGG_ALIASES
from prm_jax.evaluation.metrics import AGGREGATIONS

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a PRM over HTTP: vLLM /pooling, OpenRLHF /get_reward",
                              description="Serve a PRM over HTTP: POST /pooling (vLLM's answer for "
                                          "Qwen2ForProcessRewardModel), POST /get_reward (OpenRLHF's remote reward "
                                          "model), GET /health, GET /v1/models; requests are batched dynamically.")
    p.add_argument("--prm", required=True, type=model_dir, help="PRM directory (Hugging Face layout)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --prm)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="port (0 = any free port, printed)")
    p.add_argument("--api-key", default=os.environ.get("PRM_JAX_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every path but /health (default: $PRM_JAX_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --prm as given)")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. data=4,tensor=2 (default: all devices on data)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (e.g. bfloat16); default: the checkpoint's")
    p.add_argument("--max-length", type=positive_int, default=4096, help="tokens per input; longer ones get 400")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="rows per forward (rounded up to data shards); keep it well below the concurrent requests: "
                        "a forward is padded to this many rows, and a gathered batch sorts into several tight forwards")
    p.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                   help="a batch is taken once this many tokens are queued, and a forward holds at most this many")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0,
                   help="or once the oldest queued request has waited this long")
    p.add_argument("--max-queue", type=positive_int, default=1024, help="queued requests; one more gets 503")
    p.add_argument("--max-body-mb", type=positive_int, default=32, help="request body limit in MiB (413 past it)")
    p.add_argument("--agg", choices=AGGREGATIONS + tuple(AGG_ALIASES), default="min",
                   help="/get_reward: how step scores make a reward (default min)")
    p.add_argument("--step-split", default="blank-line",
                   help="/get_reward: how a response splits into steps: blank-line, newline, or a literal separator")
    p.add_argument("--empty-reward", type=float, default=0.0, help="/get_reward: the reward of a response with no step")
    p.add_argument("--step-token", default=DEFAULT_STEP_TOKEN, help="step separator token (name or id)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="/get_reward: the system prompt the PRM was trained with ('' for none)")
    p.add_argument("--no-warmup", action="store_true", help="do not compile every bucket's forward before serving")
    add_distributed_flags(p)
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_app(args):
    """The aiohttp app for `args` (loads the PRM, starts the scoring thread, compiles the buckets)."""
    from prm_jax.buckets import octave_buckets
    from prm_jax.evaluation.commands import load_model, load_tokenizer
    from prm_jax.models.hf import read_config
    from prm_jax.parallel.mesh import initialize_distributed, make_mesh
    from prm_jax.rewards import StepReward
    from prm_jax.serving.batcher import BatchConfig, Batcher, EncodedScorer, warm_up
    from prm_jax.serving.server import ServeConfig, make_app

    if initialize_distributed(args)[1] > 1:  # only process 0 would see the requests the others must score with it
        raise InputError("prm-jax serve runs as one process (one replica per host, on that host's devices); "
                         "start it without --coordinator/--num-processes or JAX_COORDINATOR_ADDRESS")
    mesh = make_mesh(args.mesh)
    prm = load_model(args.prm, mesh, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.prm)
    # Octave buckets (128, 256, ..., max_length): few shapes to compile before serving (30 at the defaults),
    # where eval's finer ladder would compile hundreds.
    scorer = EncodedScorer(prm, tokenizer, step_token=args.step_token, batch_size=args.batch_size,
                           max_length=args.max_length, buckets=octave_buckets(args.max_length, 1, 128), mesh=mesh,
                           tokens_per_batch=args.max_batch_tokens, system_prompt=args.system_prompt or None)
    if not args.no_warmup:
        log.info("compiled %d forward shapes", warm_up(scorer))
    batcher = Batcher(scorer, BatchConfig(args.max_batch_tokens, args.max_wait_ms, args.max_queue))
    rewarder = StepReward(scorer, args.agg, args.step_split, args.empty_reward)
    config = ServeConfig(args.served_model_name or args.prm, args.api_key, args.max_body_mb << 20,
                         read_config(args.prm).get("vocab_size"))
    return make_app(batcher, rewarder, config)


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not is_loopback(args.host) and not args.api_key:
        log.warning("binding %s without --api-key: anyone who can reach this address can use the PRM", args.host)
    try:
        asyncio.run(_serve(build_app(args), args.host, args.port, args.served_model_name or args.prm))
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(app, host: str, port: int, name: str) -> None:
    """Serve until SIGINT/SIGTERM; prints the bound address (the real port when --port 0) once ready."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        print(f"prm-jax serve: {name} on http://{host}:{bound[1]} (POST /pooling, POST /get_reward)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
