"""`prm_jax.search(policy, prm, problems, ...)`: PRM-guided test-time search with the policy and the
PRM in one process, written record by record (resumable) with a summary and a plot.

Output directory (OUT):
- search.jsonl: one record per (run, problem), appended as problems finish; `key` = run/id, where
  the run names the strategy and its settings (SearchConfig.run_name), so runs at several N and
  strategies can share one OUT and its plot. A rerun skips the keys already written.
- search_runs.json: the sampling settings of every run; a rerun of a run with other settings is
  refused (its records would mix), as is an OUT scored by another PRM (scoring.json, as in eval).
- search_summary.json and search_accuracy.png: accuracy of each answer rule and the token budget
  per run, over every record in search.jsonl.
Record: {"key", "run", "id", "problem", "answer" (gold), "strategy", "n", "beam_width", "agg",
 "candidates": [{"text", "steps", "step_scores", "score", "final_answer", "correct", "finish",
 "tokens", "path"}] (the N best finished, best first), "answers": {"weighted", "prm_argmax",
 "majority": {"index", "answer", "correct"}, "pass": bool}, "budget": {"policy_tokens",
 "prm_tokens", "prefill_tokens", "iterations"}}. policy_tokens: ids the policy generated (lookahead
 included); prm_tokens: ids the PRM read; prefill_tokens: prompt and candidate ids the policy
 prefilled, which the KV reuse (see search.engine) keeps to about one per expanded candidate and
 step after the prompt.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.errors import InputError
from prm_jax.grading import Grader, extract_answer
from prm_jax.data.steps import STEP_SEPARATOR, policy_prompt_ids, split_steps
from prm_jax.records import ResumableWriter, read_jsonl
from prm_jax.search.answers import AGGREGATIONS, pick_answers
from prm_jax.search.engine import Problem, run_problems
from prm_jax.search.policy import StepConfig, Stepper
from prm_jax.search.strategies import SearchConfig

RECORDS, RUNS, SUMMARY, PLOT = "search.jsonl", "search_runs.json", "search_summary.json", "search_accuracy.png"
PICKS = ("weighted", "prm_argmax", "majority")


def _problems(problems) -> list[dict]:
    if isinstance(problems, (str, os.PathLike)):
        from prm_jax.sampling.commands import read_problems

        return read_problems(os.fspath(problems))
    out = list(problems)
    for i, p in enumerate(out):
        missing = [k for k in ("id", "problem", "answer") if not isinstance(p, dict) or k not in p]
        if missing:
            raise InputError(f"problems[{i}]: missing key {missing[0]!r} (expected {{'id', 'problem', 'answer'}})")
    ids = [p["id"] for p in out]
    if len(set(ids)) != len(ids):
        raise InputError("problems: duplicate ids")
    return out


def _policy(policy, tokenizer, mesh, dtype):
    if isinstance(policy, (str, os.PathLike)):
        from prm_jax.models.hf import load_causal_lm, load_tokenizer

        return load_causal_lm(policy, mesh=mesh, dtype=dtype), tokenizer or load_tokenizer(policy)
    if tokenizer is None:
        raise InputError("search: pass the policy's tokenizer (tokenizer=...) with a policy model")
    return policy, tokenizer


def _scorer(prm, prm_tokenizer, mesh, dtype, step_token, batch_size, max_length, system_prompt):
    """A PRMScorer (the scorer eval uses) from a directory or a model; any other object with .score passes
    as is (a Qwen2PRM has a `score` head, hence the module test first)."""
    from flax import nnx

    from prm_jax.evaluation.scoring import PRMScorer

    if not isinstance(prm, (str, os.PathLike, nnx.Module)):
        if not callable(getattr(prm, "score", None)):
            raise InputError(f"search: prm must be a directory, a Qwen2PRM or a scorer with .score(items), "
                             f"got {type(prm).__name__}")
        return prm

    if isinstance(prm, (str, os.PathLike)):
        from prm_jax.models.hf import load_prm, load_tokenizer

        prm_tokenizer = prm_tokenizer or load_tokenizer(prm)
        prm = load_prm(prm, mesh=mesh, dtype=dtype)
    if prm_tokenizer is None:
        raise InputError("search: pass the PRM's tokenizer (prm_tokenizer=...) with a PRM model")
    return PRMScorer(prm, prm_tokenizer, step_token=step_token, batch_size=batch_size, max_length=max_length,
                     mesh=mesh, system_prompt=system_prompt)


def _check_runs(out_dir: str, run: str, settings: dict) -> None:
    """Refuse to resume a run with other settings; record this run's settings on first use."""
    path = os.path.join(out_dir, RUNS)
    runs = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    if run in runs:
        diff = sorted(k for k in set(runs[run]) | set(settings) if runs[run].get(k) != settings.get(k))
        if diff:
            raise InputError(f"{path}: run {run!r} in {out_dir} was made with other settings (differs in: "
                             f"{', '.join(diff)}); use a new --out")
        return
    runs[run] = settings
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=2)
    os.replace(tmp, path)


def make_record(p: Problem, rec: dict, cfg: SearchConfig, stepper: Stepper, grader) -> dict:
    cands = p.strategy.candidates()
    texts = [stepper.text(c.tokens) for c in cands]
    finals = [extract_answer(t) for t in texts]
    correct = grader.grade_many(finals, [str(rec["answer"])] * len(finals)) if finals else []
    return {
        "key": f"{cfg.run_name()}/{rec['id']}", "run": cfg.run_name(), "id": rec["id"], "problem": rec["problem"],
        "answer": str(rec["answer"]), "strategy": cfg.strategy, "n": cfg.n,
        "beam_width": None if cfg.strategy == "best-of-n" else cfg.beam_width, "agg": cfg.agg,
        "candidates": [{"text": t, "steps": split_steps(t), "step_scores": list(c.step_scores), "score": c.score,
                        "final_answer": f, "correct": ok, "finish": c.finish, "tokens": len(c.tokens),
                        "path": list(c.path)} for c, t, f, ok in zip(cands, texts, finals, correct)],
        "answers": pick_answers(finals, [c.score for c in cands], correct, grader.grade_many),
        "budget": {"policy_tokens": p.policy_tokens, "prm_tokens": p.prm_tokens, "prefill_tokens": p.prefill_tokens,
                   "iterations": p.strategy.iteration if cfg.strategy != "best-of-n" else 1},
    }


def summarize(records: Sequence[dict]) -> dict:
    """Per run: accuracy of each answer rule, pass@N, and the mean budget per problem."""
    runs: dict[str, list[dict]] = {}
    for r in records:
        runs.setdefault(r["run"], []).append(r)
    out = {}
    for run, rs in runs.items():
        k = len(rs)
        out[run] = {"strategy": rs[0]["strategy"], "n": rs[0]["n"], "beam_width": rs[0]["beam_width"],
                    "agg": rs[0]["agg"], "problems": k,
                    **{pick: sum(r["answers"][pick]["correct"] for r in rs) / k for pick in PICKS},
                    "pass": sum(r["answers"]["pass"] for r in rs) / k,
                    "policy_tokens": sum(r["budget"]["policy_tokens"] for r in rs) / k,
                    "prm_tokens": sum(r["budget"]["prm_tokens"] for r in rs) / k,
                    "prefill_tokens": sum(r["budget"].get("prefill_tokens", 0) for r in rs) / k}
    return out


def format_summary(summary: dict) -> str:
    lines = [f"{'run':<52}{'probs':>6}{'wBoN%':>7}{'argmax%':>8}{'maj%':>6}{'pass%':>7}{'pol tok':>9}{'prm tok':>9}"
             f"{'prefill':>9}"]
    for run, s in summary.items():
        lines.append(f"{run:<52}{s['problems']:>6}{100 * s['weighted']:>7.1f}{100 * s['prm_argmax']:>8.1f}"
                     f"{100 * s['majority']:>6.1f}{100 * s['pass']:>7.1f}{s['policy_tokens']:>9.0f}"
                     f"{s['prm_tokens']:>9.0f}{s['prefill_tokens']:>9.0f}")
    return "\n".join(lines)


def search(policy, prm, problems, *, out: str | os.PathLike | None = None, strategy: str = "beam", n: int = 4,
           beam_width: int = 4, agg: str = "last", max_steps: int = 40, lookahead: int = 0, max_tokens: int = 1024,
           temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           delimiter: str = STEP_SEPARATOR, tokenizer=None, prm_tokenizer=None,
           system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, step_token: str | int = DEFAULT_STEP_TOKEN,
           batch_size: int = 8, prm_batch_size: int = 32, prm_max_length: int = 4096, mesh=None,
           dtype: str | None = None, grade_workers: int = 2, grade_timeout: float = 5.0,
           show_progress: bool = False, plots: bool = True, reuse_kv: bool = True,
           stop_at_answer: bool = True) -> list[dict]:
    """Search every problem with `strategy` and return one record per problem (input order; see the
    module docstring). policy: a directory or a Qwen2ForCausalLM (then `tokenizer` too); prm: a
    directory, a Qwen2PRM (then `prm_tokenizer`), a PRMScorer, or any object with
    `score([(problem, steps)]) -> [[float]]`; problems: a file (our records, GSM8K, MATH-500) or a
    list of {"id", "problem", "answer"}. With `out`, records are appended to OUT/search.jsonl as
    problems finish and problems already there are not searched again. reuse_kv=False prefills every
    candidate's prefix again at each step instead of extending its kept KV cache (for comparisons:
    the keys are the same, so the results are too, up to float rounding of the logits). stop_at_answer:
    a step that states the final answer (`\\boxed{}`) finishes its candidate (see StepConfig)."""
    if agg not in AGGREGATIONS:
        raise InputError(f"agg {agg!r}: expected one of {', '.join(AGGREGATIONS)}")
    try:
        cfg = SearchConfig(strategy=strategy, n=n, beam_width=beam_width, agg=agg, max_steps=max_steps,
                           lookahead=lookahead)
    except ValueError as e:
        raise InputError(str(e)) from None
    recs = _problems(problems)
    model, tok = _policy(policy, tokenizer, mesh, dtype)
    scorer = _scorer(prm, prm_tokenizer, mesh, dtype, step_token, prm_batch_size, prm_max_length, system_prompt)
    step_cfg = StepConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          delimiter=delimiter, context=model.cfg.max_position_embeddings, stop_at_answer=stop_at_answer)
    stepper = Stepper(model, tok, step_cfg, mesh, reuse_kv=reuse_kv)
    prompts = {}
    for r in recs:
        prompts[r["id"]] = policy_prompt_ids(tok, r["problem"], system_prompt)
        if len(prompts[r["id"]]) >= step_cfg.context:
            raise InputError(f"problem {r['id']!r}: its prompt is {len(prompts[r['id']])} tokens, the policy's "
                             f"context is {step_cfg.context}")
    writer = None
    results: dict[Any, dict] = {}
    if out is not None:
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        if hasattr(scorer, "fingerprint"):
            from prm_jax.evaluation.scoring import check_resume

            check_resume(scorer, out)
        _check_runs(out, cfg.run_name(), {**dataclasses.asdict(step_cfg), "system_prompt": system_prompt})
        writer = ResumableWriter(os.path.join(out, RECORDS), key="key")
        for r in read_jsonl(os.path.join(out, RECORDS)):
            if r["run"] == cfg.run_name():
                results[r["id"]] = r
    todo = [r for r in recs if r["id"] not in results]
    from tqdm import tqdm

    bar = tqdm(total=len(recs), initial=len(recs) - len(todo), desc=f"search {cfg.strategy} n={n}", unit="problem",
               disable=not show_progress, file=sys.stderr)
    by_id = {r["id"]: r for r in recs}
    t0 = time.perf_counter()
    try:
        with Grader(grade_workers, grade_timeout) as grader:
            def done(p: Problem) -> None:
                record = make_record(p, by_id[p.id], cfg, stepper, grader)
                results[p.id] = record
                if writer is not None:
                    writer.write(record)
                bar.update(1)

            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                run_problems([(r["id"], r["problem"], prompts[r["id"]]) for r in batch], stepper, scorer, cfg, done)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - t0
    if out is not None:
        summary = summarize(read_jsonl(os.path.join(out, RECORDS)))
        summary[cfg.run_name()]["this_call"] = {"problems": len(todo), "seconds": elapsed,
                                               "problems_per_s": len(todo) / elapsed if todo else None}
        with open(os.path.join(out, SUMMARY), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        if plots:
            from prm_jax.search.plots import plot_accuracy

            plot_accuracy(list(summary.values()), os.path.join(out, PLOT))
    return [results[r["id"]] for r in recs]
