"""`prm-jax toy ...`: make toy problems, solutions with controlled errors, their true labels,
label-quality reports and the toy tokenizer (the files the demo's stages read)."""
from __future__ import annotations

import argparse
import json

from prm_jax.errors import InputError
from prm_jax.flags import unit_interval
from prm_jax.records import RecordError, iter_lines, write_jsonl


def _ops(text: str) -> tuple[str, ...]:
    from prm_jax.toyworld.world import OPS

    ops = tuple(dict.fromkeys(text))
    if not ops or any(op not in OPS for op in ops):
        raise argparse.ArgumentTypeError(f"--ops: expected characters from {''.join(OPS)}, got {text!r}")
    return ops


def _read_worlds(path: str, need: tuple[str, ...] = ()) -> list[dict]:
    """Records that carry a toy world (and the keys in `need`); errors name file:line."""
    from prm_jax.toyworld.world import world_of

    out = []
    for line in iter_lines(path):
        for key in need:
            line.get(key)
        try:
            world_of(line.record)
        except ValueError as e:
            raise RecordError(f"{line.where()}: {e}") from None
        out.append(line.record)
    return out


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="the toy arithmetic world whose step truth is known")
    sub = toy.add_subparsers(dest="toy_command", required=True)

    p = sub.add_parser("problems", help="write toy problem records {id, problem, answer, world}")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=("tiny", "small"), default="small",
                   help="difficulty preset (WorldConfig.tiny / .small); the flags below override it")
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-value", type=int, default=None)
    p.add_argument("--max-operand", type=int, default=None)
    p.add_argument("--ops", type=_ops, default=None, help="operations to use, e.g. +-*/")
    p.add_argument("--restate", action="store_true", default=None,
                   help="solution steps restate the sentence they apply ('He finds 5 more coins: 7 + 5 = 12')")
    p.set_defaults(func=cmd_problems)

    s = sub.add_parser("solutions", help="reference solutions, some with injected errors")
    s.add_argument("--problems", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--error-rate", type=unit_interval, default=0.5)
    s.add_argument("--per-problem", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_solutions)

    t = sub.add_parser("truth", help="ProcessBench-style records with the true first error of each solution")
    t.add_argument("--solutions", required=True, help="solution records that carry their world")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_truth)

    q = sub.add_parser("quality", help="how well a label source matches the truth")
    q.add_argument("--labelled", required=True, help="MC-labelled, judge-labelled or training records")
    q.add_argument("--source", choices=("mc", "judge", "labels"), required=True)
    q.add_argument("--truth", required=True, help="the solution records (with their world), by id")
    q.add_argument("--out", default=None, help="write the figures as JSON here too")
    q.set_defaults(func=cmd_quality)

    k = sub.add_parser("tokenizer", help="train the toy tokenizer on world text (nothing downloaded)")
    k.add_argument("--out", required=True, help="output directory (transformers format)")
    k.add_argument("--vocab-size", type=int, default=512)
    k.add_argument("--n", type=int, default=400, help="problems in the corpus")
    k.add_argument("--judge-template", default="toy", help="judge template whose prompts join the corpus "
                   "('toy', a shipped name, a file, or 'none')")
    k.set_defaults(func=cmd_tokenizer)


def cmd_problems(args) -> int:
    from prm_jax.toyworld.world import WorldConfig, generate_problems

    keys = ("min_steps", "max_steps", "max_value", "max_operand", "ops", "restate")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        cfg = WorldConfig.for_size(args.size, **overrides)
    except ValueError as e:
        raise InputError(str(e)) from None
    n = write_jsonl(args.out, generate_problems(args.n, args.seed, cfg))
    print(f"wrote {n} problems to {args.out}")
    return 0


def cmd_solutions(args) -> int:
    from prm_jax.toyworld.world import sample_solutions

    problems = _read_worlds(args.problems, need=("id", "problem", "answer"))
    sols = sample_solutions(problems, seed=args.seed, error_rate=args.error_rate, per_problem=args.per_problem)
    n = write_jsonl(args.out, sols)
    wrong = sum(s["generator"] != "toy-reference" for s in sols)
    print(f"wrote {n} solutions ({wrong} with an injected error) to {args.out}")
    return 0


def cmd_truth(args) -> int:
    from prm_jax.toyworld.world import processbench_record

    sols = _read_worlds(args.solutions, need=("id", "problem", "steps"))
    out = [r for r in map(processbench_record, sols) if r is not None]
    write_jsonl(args.out, out)
    n_err = sum(r["label"] >= 0 for r in out)
    print(f"wrote {len(out)} records ({n_err} with an error, {len(out) - n_err} correct; "
          f"{len(sols) - len(out)} empty solutions skipped) to {args.out}")
    return 0


def cmd_quality(args) -> int:
    from prm_jax.toyworld.truth import clean_nan, label_quality, true_first_errors

    truth = true_first_errors(_read_worlds(args.truth, need=("id", "steps")))
    labelled = [line.record for line in iter_lines(args.labelled)]
    q = clean_nan(label_quality(labelled, truth, args.source))
    text = json.dumps(q, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def cmd_tokenizer(args) -> int:
    from prm_jax.toyworld.critic import judge_corpus_texts, toy_judge_template
    from prm_jax.toyworld.tokenizer import train_tokenizer
    from prm_jax.toyworld.world import tokenizer_corpus

    extra = []
    if args.judge_template != "none":
        from prm_jax.labeling.judge import load_template

        template = toy_judge_template() if args.judge_template == "toy" else load_template(args.judge_template)
        extra = judge_corpus_texts(template)
    tok = train_tokenizer(tokenizer_corpus(args.n, extra_texts=extra), args.out, vocab_size=args.vocab_size)
    print(f"trained a {len(tok)}-token tokenizer, saved to {args.out}")
    return 0
