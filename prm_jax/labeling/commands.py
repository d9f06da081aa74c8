"""`prm-jax rollout` (MC labels), `prm-jax judge`, `prm-jax filter` and `prm-jax convert`."""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import sys
import time

from prm_jax.errors import InputError
from prm_jax.flags import (add_allow_empty, input_file, model_dir, nonneg_float, nonneg_int, positive_float,
                            positive_int, require_records, top_p)
from prm_jax.parallel.mesh import add_distributed_flags, distributed_spec, initialize_distributed
from prm_jax.records import part_path, process_shard
from prm_jax.sampling.commands import add_policy_flags


def register(sub) -> None:
    p = sub.add_parser("rollout", help="Monte-Carlo step labels: N rollouts from every step prefix",
                       description="For every solution and step i, let the policy finish N times from "
                                   "problem + steps[:i+1] and count the rollouts reaching the gold answer (a finished "
                                   "solution's last step counts its own answer, N times or none); "
                                   "writes solution + mc records; resumable.")
    p.add_argument("--policy", required=True, type=model_dir, help="policy directory (HF Qwen2ForCausalLM + tokenizer)")
    p.add_argument("--solutions", required=True, type=input_file,
                   help='solution records (JSONL with "id","problem","answer","steps")')
    p.add_argument("--out", required=True, help="MC-labelled records (JSONL; appended, resumable)")
    p.add_argument("--n", type=positive_int, default=8, help="rollouts per step prefix")
    p.add_argument("--threshold", type=nonneg_int, default=0, help="a step is positive iff correct rollouts > this")
    p.add_argument("--mode", choices=("all", "first-error", "binary"), default="all",
                   help="all steps; stop at the first hard negative; binary search for it (assumes monotonicity)")
    p.add_argument("--temperature", type=nonneg_float, default=0.7)
    p.add_argument("--top-p", type=top_p, default=0.8)
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--batch-size", type=positive_int, default=8, help="solutions labelled together")
    p.add_argument("--max-prefixes", type=positive_int, default=64, help="step prefixes per sampler call")
    add_policy_flags(p)
    p.set_defaults(func=run_rollout)

    p = sub.add_parser("judge", help="label solutions' first wrong step with an LLM judge",
                       description="Ask an LLM judge (SGLang, any OpenAI-compatible server, or a local JAX "
                                   "model) for the first wrong step of every solution; resumable and cached.")
    p.add_argument("--solutions", required=True, type=input_file,
                   help="solution records (JSONL with id, problem, steps)")
    p.add_argument("--out", required=True, help="judge-labelled records (JSONL; appended, resumable)")
    p.add_argument("--api", choices=("sglang", "openai", "local"), default="sglang")
    p.add_argument("--endpoint", help="server URL, e.g. http://127.0.0.1:30000 (sglang, openai)")
    p.add_argument("--model", help="model name sent to the server and stored in the records; for --api local, "
                                   "the HF model directory (default: the server's model_path for sglang)")
    p.add_argument("--tokenizer", help="judge tokenizer directory whose chat template is applied "
                                       "(sglang: required; local: defaults to --model)")
    p.add_argument("--template", default="default", help="template file, or a shipped name: default, boxed")
    p.add_argument("--samples", type=positive_int, default=1, help="replies per solution; majority vote when > 1")
    p.add_argument("--concurrency", type=positive_int, default=64, help="requests in flight")
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts per /generate request (sglang, local)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request")
    p.add_argument("--max-retries", type=nonneg_int, default=6)
    p.add_argument("--max-rps", type=positive_float, default=None, help="cap on request starts per second")
    p.add_argument("--max-new-tokens", type=positive_int, default=2048)
    p.add_argument("--temperature", type=nonneg_float, default=None, help="default 0 with one sample, 0.7 with several")
    p.add_argument("--top-p", type=top_p, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (openai)")
    p.add_argument("--cache", help="reply cache (default: OUT.cache.jsonl)")
    p.add_argument("--failed", help="list of records that got no reply (default: OUT.failed.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    add_allow_empty(p)
    add_distributed_flags(p)  # --api local only: each process judges its shard into its own part file
    p.set_defaults(func=run_judge)

    p = sub.add_parser("filter", help="consensus filter: keep solutions where MC and judge agree",
                       description="Keep a solution iff its MC first error equals the judge's (both -1 included) "
                                   "and write training records; report retention and agreement.")
    p.add_argument("--mc", required=True, type=input_file, help="MC-labelled records (JSONL with mc.first_error)")
    p.add_argument("--judge", required=True, type=input_file,
                   help="judge-labelled records (JSONL with judge.first_error)")
    p.add_argument("--out", required=True, help="training records (JSONL)")
    p.add_argument("--report", required=True, help="report (JSON)")
    add_allow_empty(p)
    p.set_defaults(func=run_filter)

    from prm_jax.data.formats import FORMATS

    p = sub.add_parser("convert", help="convert between PRM data formats",
                       description="Convert a data file between formats: " + ", ".join(FORMATS))
    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS)
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    add_allow_empty(p)
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=run_convert)


def _make_client(args):
    from prm_jax.labeling import judge_clients as jc

    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.7)
    if args.samples > 1 and temperature == 0:
        print("prm-jax judge: --samples > 1 with temperature 0 asks for the same greedy reply several times",
              file=sys.stderr)
    sampling = jc.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                                 top_k=args.top_k, seed=args.seed)
    if args.api == "local":
        if not args.model:
            raise InputError("--api local needs --model (an HF chat model directory)")
        return local_client(args.model, args.tokenizer or args.model, sampling), args.model
    if not args.endpoint:
        raise InputError(f"--api {args.api} needs --endpoint URL")
    common = dict(concurrency=args.concurrency, timeout=args.timeout, max_rps=args.max_rps,
                  retry=jc.RetryPolicy(max_retries=args.max_retries), seed=args.seed)
    if args.api == "openai":
        if not args.model:
            raise InputError("--api openai needs --model (the served model's name)")
        return jc.OpenAIClient(args.endpoint, args.model, sampling, api_key=args.api_key, **common), args.model
    if not args.tokenizer:
        raise InputError("--api sglang needs --tokenizer DIR (the judge's chat template)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    return jc.SGLangClient(args.endpoint, args.model or "", sampling, tokenizer=tok, **common), args.model


def local_client(model_dir: str, tokenizer_dir: str, sampling):
    """The judge on a local HF chat model through the JAX sampler, in this process."""
    from prm_jax.labeling.judge_clients import LocalClient
    from prm_jax.models.hf import load_causal_lm, load_tokenizer
    from prm_jax.sampling.ids import default_stop_ids
    from prm_jax.sampling.sampler import generate

    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(tokenizer_dir)
    stops = default_stop_ids(tokenizer)
    run = functools.partial(generate, model, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, top_k=max(sampling.top_k, 0), seed=sampling.seed, stop_ids=stops)
    return LocalClient(run, tokenizer, sampling, model_name=model_dir, stop_ids=stops)


async def _judge(args) -> int:
    from prm_jax.labeling.judge import judge_solutions, load_template
    from prm_jax.labeling.solutions import read_solutions

    template = load_template(args.template)
    solutions = read_solutions(args.solutions)
    require_records(solutions, args.solutions, args.allow_empty)
    solutions = process_shard(solutions, *args.process)
    empty = [s for s in solutions if not s.record["steps"]]
    if empty:
        solutions = [s for s in solutions if s.record["steps"]]
        print(f"{len(empty)} solutions with no steps left out (nothing to judge), e.g. {empty[0].where}")
    client, model = _make_client(args)
    async with client:
        if args.api == "sglang" and not model:
            model = client.model_info.get("model_path") or "sglang"
        if args.api == "openai" and args.batch_size != 1:
            print("prm-jax judge: --batch-size ignored for --api openai (one prompt per request)", file=sys.stderr)
        summary = await judge_solutions(
            solutions, client, out_path=args.out, template=template, model=model, samples=args.samples,
            cache_path=args.cache, failed_path=args.failed,
            batch_size=1 if args.api == "openai" else args.batch_size, progress=not args.no_progress)
    for line in summary.lines():
        print(line)
    if client.counters.errors:
        print("errors retried or failed: " + ", ".join(f"{k}={v}" for k, v in sorted(client.counters.errors.items())))
    if summary.failed:
        print(f"{summary.failed} records got no reply; listed in {args.failed or args.out + '.failed.jsonl'} "
              f"(run the same command again to retry them)", file=sys.stderr)
        return 3
    return 0


def run_judge(args) -> int:
    args.process = (0, 1)
    if args.api == "local":
        args.process = initialize_distributed(args)
        args.out, args.cache, args.failed = (part_path(p, *args.process) if p else None
                                             for p in (args.out, args.cache, args.failed))
    elif distributed_spec(args) is not None and distributed_spec(args).source == "flags":
        raise InputError(f"--coordinator/--num-processes/--process-id: --api {args.api} computes nothing with JAX "
                         "(the server does); they apply to --api local")
    return asyncio.run(_judge(args))


def run_filter(args) -> int:
    from prm_jax.labeling.consensus import consensus_filter, format_report, load_labelled
    from prm_jax.records import write_jsonl

    mc = load_labelled(args.mc, "mc")
    require_records(mc, args.mc, args.allow_empty)
    judged = load_labelled(args.judge, "judge")
    require_records(judged, args.judge, args.allow_empty)
    kept, report = consensus_filter(mc, judged)
    write_jsonl(args.out, kept)
    tmp = f"{args.report}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.report)  # atomic, like the records
    print(format_report(report))
    return 0


def run_convert(args) -> int:
    from prm_jax.data.formats import convert

    result = convert(args.src_format, args.dst_format, args.input, args.output, skip_bad=args.skip_bad,
                     allow_empty=args.allow_empty)
    print(f"{args.input} ({args.src_format}) -> {args.output} ({args.dst_format}): "
          f"{result.written} records written, {len(result.skipped)} skipped")
    if result.dropped:
        print(f"  dropped keys the {args.dst_format} format has no field for: "
              + ", ".join(f"{k} ({n} records)" for k, n in result.dropped.items()), file=sys.stderr)
    for msg in result.skipped[:10]:
        print(f"  skipped {msg}", file=sys.stderr)
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more", file=sys.stderr)
    return 0


# -- rollout (MC labels) --------------------------------------------------------------------------------------------

def run_rollout(args) -> int:
    from prm_jax.data.steps import rollout_prefix_ids
    from prm_jax.grading import Grader
    from prm_jax.labeling.mc import MCConfig, SamplerPolicy, hard_labels, label_solutions
    from prm_jax.labeling.solutions import read_solutions
    from prm_jax.models.hf import load_tokenizer
    from prm_jax.records import ResumableWriter
    from prm_jax.sampling.commands import check_context, load_policy, progress_bar, setup_run, system_prompt

    try:
        cfg = MCConfig(n=args.n, threshold=args.threshold, mode=args.mode, max_prefixes=args.max_prefixes)
    except ValueError as e:
        raise InputError(str(e)) from None
    solutions = [sol.record for sol in read_solutions(args.solutions, need_answer=True)]
    require_records(solutions, args.solutions, args.allow_empty)
    tok = load_tokenizer(args.policy)
    check_context(args, tok, ((s["id"], rollout_prefix_ids(tok, s["problem"], s["steps"], len(s["steps"]) - 1,
                                                          system_prompt(args)))
                              for s in solutions if s["steps"]), "the longest rollout prefix")
    pidx, pcount, mesh, out_path = setup_run(args)
    solutions = process_shard(solutions, pidx, pcount)
    t0 = time.perf_counter()
    stats = collections.Counter()
    first_errors: collections.Counter = collections.Counter()
    with ResumableWriter(out_path) as out, Grader(args.grade_workers, args.grade_timeout) as grader:
        todo = [s for s in solutions if s["id"] not in out.done]
        print(f"rollout: {len(solutions)} solutions, {len(solutions) - len(todo)} already done in {out_path}",
              file=sys.stderr)
        policy = None
        if todo:
            model = load_policy(args, mesh, tok)
            policy = SamplerPolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                   system_prompt=system_prompt(args), mesh=mesh)
            bar = progress_bar(len(todo), f"rollout ({args.mode}, n={args.n})", args.no_progress)
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                mcs = label_solutions(batch, policy, cfg, grade=grader.grade_many)
                for s, mc in zip(batch, mcs):
                    if out.write({**s, "mc": mc}):
                        labels = hard_labels(mc)
                        stats["written"] += 1
                        stats["steps"] += len(labels)
                        stats["evaluated"] += sum(c is not None for c in mc["correct"])
                        stats["positive"] += sum(labels)
                        stats["rollouts"] += mc["rollouts"]
                        first_errors[mc["first_error"]] += 1
                bar.update(len(batch))
                bar.set_postfix(rollouts=stats["rollouts"])
            bar.close()
    dt = time.perf_counter() - t0
    n = stats["written"]
    tokens = policy.tokens_generated if policy else 0
    print(f"rollout: wrote {n} MC-labelled solutions to {out_path} in {dt:.1f}s; mode {args.mode}, "
          f"n={args.n}, threshold {args.threshold}")
    print(f"rollout: {stats['rollouts']} rollouts ({stats['rollouts'] / max(dt, 1e-9):.1f}/s, {tokens} tokens), "
          f"{stats['evaluated']} of {stats['steps']} steps evaluated")
    if n:
        none = first_errors.pop(-1, 0)
        mean_fe = (sum(k * v for k, v in first_errors.items()) / sum(first_errors.values())) if first_errors else 0.0
        print(f"rollout: steps positive {stats['positive'] / max(stats['steps'], 1):.3f}; "
              f"solutions without an error {none}/{n}; mean first error (when one) {mean_fe:.2f}")
    if policy:
        from prm_jax.sampling.sampler import total_stats
        print(f"rollout: {total_stats().summary()}")
    return 0
