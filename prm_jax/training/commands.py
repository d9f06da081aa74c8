"""`prm-jax train` and `prm-jax export`."""
from __future__ import annotations

import argparse
import logging
import os

import yaml

from prm_jax.errors import InputError
from prm_jax.models.config import PRESETS
from prm_jax.parallel.mesh import add_distributed_flags, initialize_distributed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a PRM (or a policy with --objective lm); rerun on the same --out to resume",
                       description="Train a PRM or a policy. Running again on an existing --out resumes from its "
                                   "latest checkpoint.")
    p.add_argument("--init", help="Hugging Face model directory to start from (a causal LM gets a fresh score head)")
    p.add_argument("--init-config", help=f"build a fresh model instead: a preset ({', '.join(PRESETS)}) "
                                         "or a YAML file of Qwen2Config fields (may hold 'preset')")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the --init directory)")
    p.add_argument("--train", required=True, help="training records (JSONL)")
    p.add_argument("--eval", help="held-out records (JSONL), evaluated every run.eval_every steps and at the end")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, tokenizer/, hf/")
    p.add_argument("--config", help="YAML recipe (sections model, data, optim, run)")
    p.add_argument("--objective", choices=("prm", "prm-soft", "lm"), default="prm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=100 --set lr=2e-6 --set mesh=data=2,fsdp=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_distributed_flags(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser("export", help="write the Hugging Face layout of a saved checkpoint step")
    e.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or checkpoints/<step>")
    e.add_argument("--step", type=int, help="step to export (default: the latest, or the one named by --checkpoint)")
    e.add_argument("--out", required=True, help="output directory")
    add_distributed_flags(e)
    e.set_defaults(func=run_export)


def build_config(args):
    from prm_jax.training.config import apply_overrides, from_dict, load_config

    cfg = load_config(args.config)
    if args.init_config or args.tokenizer:
        d = cfg.to_dict()
        if args.init_config:
            if os.path.isfile(args.init_config):
                with open(args.init_config, encoding="utf-8") as f:
                    spec = yaml.safe_load(f) or {}
                if not isinstance(spec, dict):
                    raise InputError(f"{args.init_config}: expected a mapping of Qwen2Config fields")
                d["model"]["preset"] = spec.pop("preset", "tiny")
                d["model"]["overrides"] = {**d["model"]["overrides"], **spec}
            else:
                d["model"]["preset"] = args.init_config
        if args.tokenizer:
            d["model"]["tokenizer"] = args.tokenizer
        cfg = from_dict(d, source="command line")
    return apply_overrides(cfg, args.set)


def run_train(args) -> int:
    from prm_jax.training.trainer import format_summary, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.init and args.init_config:
        raise InputError("give --init or --init-config, not both")
    cfg = build_config(args)
    initialize_distributed(args)
    summary = train(cfg, args.train, args.out, init_dir=args.init, eval_file=args.eval,
                    objective=args.objective, progress=not args.quiet)
    print(format_summary(summary))
    return 143 if summary["status"] == "preempted" else 0


def run_export(args) -> int:
    from prm_jax.training.checkpoint import export_hf

    initialize_distributed(args)
    out = export_hf(args.checkpoint, args.out, step=args.step)
    print(f"wrote {out}")
    return 0
