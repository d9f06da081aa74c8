"""`prm-jax sample` (policy solutions for problems), and the plumbing every stage that runs the policy
shares (flags, setup, loading, the context-length rule); `prm-jax rollout` is labeling's.

Sample and rollout append their output record by record through ResumableWriter as each batch finishes: a
restart on the same --out skips the ids already written, and a kill -9 loses at most the batch in
flight (never a duplicated or torn line). Randomness is tied to record ids (sample k of problem p,
rollout j of step i of solution s), not to batches, so a resumed run draws what the first would
have. Multi-host: every process takes its strided shard of the input and writes its own part file
(out.part-0000i-of-0000n.jsonl), running on a mesh over its local devices.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT
from prm_jax.errors import InputError
from prm_jax.flags import (add_allow_empty, input_file, model_dir, nonneg_float, nonneg_int, positive_float,
                            positive_int, require_records, top_p)
from prm_jax.models.runtime import DTYPES
from prm_jax.parallel.mesh import add_distributed_flags
from prm_jax.records import RecordError, iter_lines

PROBLEM_FORMATS = ("auto", "records", "gsm8k", "math")


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample policy solutions for problems (JAX sampler)",
                       description="Sample N solutions per problem with the policy, split them into steps "
                                   "and extract the final answer; resumable.")
    p.add_argument("--policy", required=True, type=model_dir, help="policy directory (HF Qwen2ForCausalLM + tokenizer)")
    p.add_argument("--problems", required=True, type=input_file,
                   help='problems: JSONL {"id","problem","answer"}, or raw GSM8K / MATH(-500) JSONL')
    p.add_argument("--format", choices=PROBLEM_FORMATS, default="auto", help="problem file format (default: "
                   "detected from the first record)")
    p.add_argument("--out", required=True, help="solution records (JSONL; appended, resumable)")
    p.add_argument("--n", type=positive_int, default=1, help="solutions per problem")
    p.add_argument("--temperature", type=nonneg_float, default=0.7)
    p.add_argument("--top-p", type=top_p, default=0.8)
    p.add_argument("--top-k", type=nonneg_int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--batch-size", type=positive_int, default=16, help="problems per batch (n rows each)")
    add_policy_flags(p)
    p.set_defaults(func=run_sample)


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "data=4,tensor=2" (default: all devices on data)')
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="policy system prompt ('' for none; default: Qwen2.5-Math's CoT prompt)")
    p.add_argument("--grade-workers", type=nonneg_int, default=2,
                   help="processes grading answers with math-verify (0: grade in this process)")
    p.add_argument("--grade-timeout", type=positive_float, default=5.0, help="seconds of math-verify per answer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_allow_empty(p)
    add_distributed_flags(p)


# -- input ------------------------------------------------------------------------------------------

def gold_answer(line) -> str:
    ans = line.get("answer", (str, int, float))
    if isinstance(ans, bool):
        raise RecordError(f"{line.where()}: key 'answer' should be str or a number, got bool")
    return str(ans)


def _detect_format(path: str) -> str:
    for line in iter_lines(path):
        rec = line.record
        if "question" in rec and "problem" not in rec:
            return "gsm8k"
        if "problem" in rec and "id" not in rec and ("solution" in rec or "unique_id" in rec):
            return "math"
        return "records"
    return "records"


def _check_unique(recs: list[tuple[str, dict]], path: str) -> None:
    seen: dict[Any, str] = {}
    for where, rec in recs:
        if rec["id"] in seen:
            raise RecordError(f"{where}: duplicate id {rec['id']!r} (first at {seen[rec['id']]})")
        seen[rec["id"]] = where


def read_problems(path: str, fmt: str = "auto") -> list[dict[str, Any]]:
    """Problem records {"id","problem","answer", ...other keys kept}; raw GSM8K (answer after "####",
    id gsm8k-<index>) and MATH-500 (`answer`, id = unique_id) files are converted."""
    path = os.fspath(path)
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt in ("gsm8k", "math"):
        from prm_jax.data import formats

        recs = formats.read(fmt, path).records
        _check_unique([(f"{path} record {i + 1}", r) for i, r in enumerate(recs)], path)
        return recs
    out = []
    for line in iter_lines(path):
        line.get("id", (str, int))
        line.get("problem", str)
        rec = dict(line.record)
        rec["answer"] = gold_answer(line)
        out.append((line.where(), rec))
    _check_unique(out, path)
    return [r for _, r in out]


# -- shared plumbing ---------------------------------------------------------------------------------

def setup_run(args):
    """(process index, process count, mesh or None, output path) for this host."""
    import jax

    from prm_jax.parallel.mesh import initialize_distributed, make_mesh
    from prm_jax.records import part_path

    pidx, pcount = initialize_distributed(args)
    mesh = None
    if args.mesh or pcount > 1:
        mesh = make_mesh(args.mesh, devices=jax.local_devices())
    return pidx, pcount, mesh, part_path(args.out, pidx, pcount)


def load_policy(args, mesh, tokenizer):
    from prm_jax.models.hf import load_causal_lm

    t0 = time.perf_counter()
    model = load_causal_lm(args.policy, mesh=mesh, dtype=args.dtype)
    print(f"loaded policy {args.policy} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model


def check_context(args, tokenizer, prompts: Iterator[tuple[Any, list[int]]], what: str) -> None:
    """The rule for long inputs: every prompt (`what`, e.g. a problem's chat prefix, or a solution's
    longest rollout prefix) plus --max-new-tokens must fit the policy's context
    (config.json `max_position_embeddings`). Checked for all records before any output is made; the
    first one that does not fit is named, with its length."""
    from prm_jax.models.hf import read_config

    context = int(read_config(args.policy).get("max_position_embeddings", 32768))
    for rid, ids in prompts:
        if len(ids) + args.max_new_tokens > context:
            raise InputError(f"{what} of record {rid!r} is {len(ids)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} it exceeds the policy's context of {context} tokens "
                             f"(shorten or drop it, or lower --max-new-tokens)")


def progress_bar(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", disable=disable, dynamic_ncols=True)


def system_prompt(args) -> str | None:
    return args.system_prompt or None


# -- sample ---------------------------------------------------------------------------------------------

def run_sample(args) -> int:
    from prm_jax.grading import Grader, extract_answer
    from prm_jax.sampling.ids import default_stop_ids, stable_key_id
    from prm_jax.data.steps import policy_prompt_ids, split_steps
    from prm_jax.models.hf import load_tokenizer
    from prm_jax.records import ResumableWriter, process_shard

    problems = read_problems(args.problems, args.format)
    require_records(problems, args.problems, args.allow_empty)
    tok = load_tokenizer(args.policy)
    check_context(args, tok, ((p["id"], policy_prompt_ids(tok, p["problem"], system_prompt(args))) for p in problems),
                  "the prompt")
    pidx, pcount, mesh, out_path = setup_run(args)
    problems = process_shard(problems, pidx, pcount)
    generator = os.path.basename(os.path.normpath(args.policy))
    t0 = time.perf_counter()
    stats = collections.Counter()
    with ResumableWriter(out_path) as out, Grader(args.grade_workers, args.grade_timeout) as grader:
        ids = lambda p: [f"{p['id']}-{k}" for k in range(args.n)]  # noqa: E731
        todo = [p for p in problems if any(i not in out.done for i in ids(p))]
        print(f"sample: {len(problems)} problems, {len(problems) - len(todo)} already done in {out_path}",
              file=sys.stderr)
        if todo:
            from prm_jax.sampling.sampler import generate_from_prefixes

            model = load_policy(args, mesh, tok)
            stops = default_stop_ids(tok)
            bar = progress_bar(len(todo), "sample", args.no_progress)
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                prompts = [policy_prompt_ids(tok, p["problem"], system_prompt(args)) for p in batch]
                outs = generate_from_prefixes(model, prompts, args.n, args.max_new_tokens,
                                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                              seed=args.seed, stop_ids=stops, mesh=mesh,
                                              key_ids=[stable_key_id(str(p["id"])) for p in batch])
                recs = []
                for p, samples in zip(batch, outs):
                    for k, toks in enumerate(samples):
                        text = tok.decode(toks, skip_special_tokens=True)
                        stats["tokens"] += len(toks)
                        stats["truncated"] += int(not toks or toks[-1] not in stops)
                        recs.append({**p, "id": f"{p['id']}-{k}", "problem_id": p["id"], "steps": split_steps(text),
                                     "final_answer": extract_answer(text), "generator": generator})
                correct = grader.grade_many([r["final_answer"] for r in recs], [r["answer"] for r in recs])
                for r, ok in zip(recs, correct):
                    r["final_answer_correct"] = ok
                    if out.write(r):
                        stats["written"] += 1
                        stats["correct"] += int(ok)
                        stats["no_answer"] += int(r["final_answer"] is None)
                bar.update(len(batch))
            bar.close()
    dt = time.perf_counter() - t0
    n = stats["written"]
    print(f"sample: wrote {n} solutions for {len(todo)} problems to {out_path} in {dt:.1f}s "
          f"({stats['tokens']} tokens, {stats['tokens'] / max(dt, 1e-9):.1f} tok/s)")
    if n:
        print(f"sample: accuracy {stats['correct'] / n:.3f} ({stats['correct']}/{n}), "
              f"no final answer {stats['no_answer']}, hit max-new-tokens {stats['truncated']}")
    if todo:
        from prm_jax.sampling.sampler import total_stats
        print(f"sample: {total_stats().summary()}")
    return 0
