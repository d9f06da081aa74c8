"""`prm-jax eval processbench` and `prm-jax eval bon`."""
from __future__ import annotations

import argparse
import logging

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN, DEFAULT_SYSTEM_PROMPT
from prm_jax.flags import input_file, model_dir, nonneg_int, positive_int
from prm_jax.models.runtime import DTYPES
from prm_jax.parallel.mesh import add_distributed_flags


def load_model(path: str, mesh, dtype: str | None):
    """The PRM from a Hugging Face-layout directory, created directly on the mesh."""
    from prm_jax.models.hf import load_prm

    return load_prm(path, mesh=mesh, dtype=dtype)


def load_tokenizer(path: str):
    from prm_jax.models.hf import load_tokenizer as load

    return load(path)


def _threshold(text: str) -> float | str:
    if text == "tune":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold: expected a number in (0, 1) or 'tune', got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--threshold: expected a number in (0, 1], got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prm", required=True, type=model_dir, help="PRM directory (Hugging Face layout: config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --prm)")
    p.add_argument("--out", required=True, help="output directory (a rerun on the same one resumes)")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. data=4,tensor=2 (default: all devices on data)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward (rounded up to the data shards)")
    p.add_argument("--max-length", type=positive_int, default=4096,
                   help="tokens per input; steps whose step token falls beyond it get no score")
    p.add_argument("--tokens-per-batch", type=nonneg_int, default=16384,
                   help="cap on rows x bucket length per forward, so long buckets get fewer rows (attention "
                        "scores grow with rows x length^2); 0 = no cap")
    p.add_argument("--step-token", default=DEFAULT_STEP_TOKEN, help="step separator token (name or id)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="the system prompt the PRM was trained with ('' for none; default: Qwen2.5-Math's CoT prompt)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (e.g. bfloat16); default: the checkpoint's")
    p.add_argument("--scoring-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="bfloat16: backbone matmuls in bf16, softmax/norms/score head in f32; auto (without --dtype): "
                        "the faster at equal rankings on this platform (bf16 on GPU/TPU and on CPUs with AMX, else f32)")
    p.add_argument("--no-plots", action="store_true")
    add_distributed_flags(p)


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a PRM: ProcessBench, Best-of-N")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    pb = sub.add_parser("processbench", help="first-error F1 on ProcessBench")
    _common(pb)
    pb.add_argument("--data", required=True, help="directory with gsm8k.json, math.json, ... (as published)")
    pb.add_argument("--subsets", default="gsm8k,math,olympiadbench,omnimath")
    pb.add_argument("--threshold", type=_threshold, default=0.5,
                    help="step score below which a step is called wrong, or 'tune' (best F1 on the --tune-on subset)")
    pb.add_argument("--tune-on", default="gsm8k", metavar="SUBSET",
                    help="with --threshold tune: the subset whose F1 picks the threshold (default gsm8k)")
    pb.add_argument("--limit", type=positive_int, default=None,
                    help="per subset: the first ceil(L/2) erroneous and floor(L/2) correct samples (smoke runs)")
    pb.set_defaults(func=cmd_processbench)

    bon = sub.add_parser("bon", help="Best-of-N: prm@N vs maj@N vs pass@N")
    _common(bon)
    bon.add_argument("--responses", required=True, type=input_file, help="solution records from `prm-jax sample` (JSONL)")
    bon.add_argument("--agg", choices=("product", "min", "last", "mean"), default="product",
                     help="how step scores make a response score (default product, as the paper)")
    bon.set_defaults(func=cmd_bon)


def _scorer(args):
    from prm_jax.evaluation.scoring import PRMScorer, default_scoring_dtype
    from prm_jax.parallel.mesh import initialize_distributed, make_mesh

    initialize_distributed(args)
    mesh = make_mesh(args.mesh)
    prm = load_model(args.prm, mesh, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.prm)
    return PRMScorer(prm, tokenizer, step_token=args.step_token, batch_size=args.batch_size,
                     max_length=args.max_length, mesh=mesh, tokens_per_batch=args.tokens_per_batch or None,
                     system_prompt=args.system_prompt or None,
                     compute_dtype=(None if args.dtype else default_scoring_dtype()) if args.scoring_dtype == "auto"
                     else args.scoring_dtype)


def cmd_processbench(args) -> int:
    from prm_jax.evaluation.processbench import run_processbench

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    run_processbench(_scorer(args), args.data, args.out, subsets, args.threshold, args.limit,
                     plots=not args.no_plots, tune_subset=args.tune_on)
    return 0


def cmd_bon(args) -> int:
    from prm_jax.evaluation.best_of_n import run_bon

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_bon(_scorer(args), args.responses, args.out, args.agg, plots=not args.no_plots)
    return 0
