"""`prm-jax search`: PRM-guided test-time search (best-of-N, beam, DVTS) with the policy and the PRM
in one process; resumable into --out (see prm_jax.search.run)."""
from __future__ import annotations

import logging
import os

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.data.steps import STEP_SEPARATOR
from prm_jax.flags import (add_allow_empty, input_file, model_dir, nonneg_float, nonneg_int, positive_float,
                           positive_int, require_records, top_p)
from prm_jax.models.runtime import DTYPES
from prm_jax.parallel.mesh import add_distributed_flags

STRATEGIES = ("best-of-n", "beam", "dvts")  # = search.strategies.STRATEGIES (not imported: no JAX for --help)
AGGREGATIONS = ("last", "min", "prod")


def register(sub) -> None:
    p = sub.add_parser("search", help="PRM-guided test-time search: best-of-N, step-level beam search, DVTS",
                       description="Search solutions for problems with the policy, guided step by step by the PRM "
                                   "(both in this process); writes OUT/search.jsonl (resumable), a summary and a "
                                   "plot of accuracy against N (weighted best-of-N, majority vote, pass@N).")
    p.add_argument("--policy", required=True, type=model_dir, help="policy directory (HF Qwen2ForCausalLM + tokenizer)")
    p.add_argument("--prm", required=True, type=model_dir, help="PRM directory (HF layout, ours or Qwen2.5-Math-PRM)")
    p.add_argument("--problems", required=True, type=input_file,
                   help='problems: JSONL {"id","problem","answer"}, or raw GSM8K / MATH(-500) JSONL')
    p.add_argument("--out", required=True, help="output directory (a rerun on the same one resumes)")
    p.add_argument("--strategy", choices=STRATEGIES, default="beam")
    p.add_argument("--n", type=positive_int, default=4, help="N: candidates per problem (beams, samples)")
    p.add_argument("--beam-width", type=positive_int, default=4,
                   help="M: beam keeps N/M beams, each expanded M ways; dvts runs N/M subtrees of width M")
    p.add_argument("--agg", choices=AGGREGATIONS, default="last", help="step scores -> candidate score")
    p.add_argument("--max-steps", type=positive_int, default=40,
                   help="search iterations; the last one writes each solution to its end")
    p.add_argument("--lookahead", type=nonneg_int, default=0, help="greedy steps past a candidate step to score it")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="new tokens per generation call")
    p.add_argument("--temperature", type=nonneg_float, default=0.8)
    p.add_argument("--top-p", type=top_p, default=1.0)
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--delimiter", default=STEP_SEPARATOR, help="text that ends a step (default: a blank line)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8, help="problems searched together")
    p.add_argument("--prm-batch-size", type=positive_int, default=32, help="rows per PRM forward")
    p.add_argument("--prm-max-length", type=positive_int, default=4096, help="tokens per PRM input")
    p.add_argument("--step-token", default=DEFAULT_STEP_TOKEN, help="the PRM's step token (name or id)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt of policy and PRM ('' for none; default: Qwen2.5-Math's CoT prompt)")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=4,tensor=2" (default: one device)')
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--grade-workers", type=nonneg_int, default=2,
                   help="processes grading answers with math-verify (0: grade in this process)")
    p.add_argument("--grade-timeout", type=positive_float, default=5.0, help="seconds of math-verify per answer")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_allow_empty(p)
    add_distributed_flags(p)
    p.set_defaults(func=run_search)


def run_search(args) -> int:
    from prm_jax.errors import InputError
    from prm_jax.sampling.commands import read_problems
    from prm_jax.search.run import format_summary, search, summarize

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.delimiter:
        raise InputError("--delimiter: expected a non-empty string")
    problems = read_problems(args.problems)
    require_records(problems, args.problems, args.allow_empty)
    import jax

    from prm_jax.parallel.mesh import initialize_distributed, make_mesh
    from prm_jax.records import process_shard

    pidx, pcount = initialize_distributed(args)
    out = args.out
    if pcount > 1:  # as sample: each process searches its strided shard into its own part directory
        problems = process_shard(problems, pidx, pcount)
        out = os.path.join(args.out, f"part-{pidx:05d}-of-{pcount:05d}")
    mesh = make_mesh(args.mesh, devices=jax.local_devices()) if args.mesh else None
    records = search(args.policy, args.prm, problems, out=out, strategy=args.strategy, n=args.n,
                     beam_width=args.beam_width, agg=args.agg, max_steps=args.max_steps, lookahead=args.lookahead,
                     max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     seed=args.seed, delimiter=args.delimiter.encode().decode("unicode_escape"),
                     system_prompt=args.system_prompt or None, step_token=args.step_token,
                     batch_size=args.batch_size, prm_batch_size=args.prm_batch_size,
                     prm_max_length=args.prm_max_length, mesh=mesh, dtype=args.dtype,
                     grade_workers=args.grade_workers, grade_timeout=args.grade_timeout,
                     show_progress=not args.no_progress, plots=not args.no_plots)
    print(format_summary(summarize(records)))
    return 0
