"""`prm-jax demo`: the paper's whole recipe, end to end, on the toy world whose truth is known.

Every stage runs through the same `prm-jax` subcommand a user would type and writes its files
under --out, so the demo doubles as an executable tutorial:

  world    problems, a tokenizer trained locally, training sets for the policy and the critic
  policy   train a tiny policy with the causal-LM loss (it should solve a fair share, not all)
  sample   the policy writes several solutions per problem
  rollout  Monte-Carlo labels: N rollouts from every step prefix (shared-prefix sampling)
  critic   train the critic, the stand-in for the paper's (ten times larger) judge model: a model
           that solves the problems (default judge), or one that writes ProcessBench critiques
  judge    the critic judges every solution: it re-derives each step from the steps before it,
           never seeing the step it checks (toyworld.rederive); with --judge critic it critiques
           whole solutions through `prm-jax judge`'s in-process backend
  filter   consensus filter; MC-only and judge-only training sets for comparison
  prm-*    a PRM trained on each label set (initialised from the policy, as the paper from its
           instruct model)
  heldout  ProcessBench-style sets of fresh policy samples labelled by the truth: `toy`, on which
           the PRMs are scored, and `dev` (other problems), on which each PRM's threshold is tuned
  eval-*   each PRM on the held-out set (first-error F1 at its dev-tuned threshold) and by Best-of-N
  search   `prm-jax search` on held-out problems with the consensus PRM: weighted best-of-N and
           step-level beam search against majority vote, at the same N
  report   label quality against the truth, PRM F1 vs the outcome-only baseline, Best-of-N

Because the toy world knows every step's truth, the report measures what the paper could only
estimate: how often MC, the judge and their consensus find the true first error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from prm_jax.errors import InputError, RunError
from prm_jax.flags import unit_interval
from prm_jax.labeling.consensus import training_record
from prm_jax.models.qwen2 import Qwen2Config
from prm_jax.records import OutputLock, read_jsonl, write_jsonl
from prm_jax.toyworld import critic, heldout, truth, world
from prm_jax.toyworld import report as toy_report
from prm_jax.toyworld.report import load_json
from prm_jax.toyworld.tokenizer import train_tokenizer
from prm_jax.toyworld.world import ERROR_KINDS, WorldConfig
from prm_jax.training.config import coerce

STAGES = ("world", "policy", "sample", "rollout", "critic", "judge", "filter", "prm-consensus", "prm-mc",
          "prm-judge", "heldout", "eval-consensus", "eval-mc", "eval-judge", "search", "report")
LABEL_SETS = ("consensus", "mc", "judge")
DEMO_SETS_MODEL = ("vocab_size", "max_position_embeddings")  # model fields stage_world sets itself
SETTINGS_FILE = "demo_settings.json"
LOCK_FILE = "demo.lock"  # held by the run writing the directory (records.OutputLock)


@dataclasses.dataclass(frozen=True)
class DemoSize:
    world: str  # WorldConfig preset
    world_overrides: dict[str, Any]  # on top of the preset
    model: dict[str, Any]  # Qwen2Config fields of the policy / critic / PRMs (all the same shape)
    vocab_size: int
    policy_problems: int
    policy_steps: int
    policy_batch: int
    critic_problems: int
    critic_steps: int
    label_problems: int
    samples_per_problem: int
    rollouts: int
    prm_steps: int
    prm_batch: int
    heldout_problems: int
    bon_n: int
    lr: float = 3e-3
    prm_lr: float = 1e-3
    policy_error_rate: float = 0.1  # share of the policy's training solutions with an injected error
    max_new_tokens: int = 96  # per sampled solution (rollouts, which continue a prefix, get 2/3 of it)
    buckets: tuple[int, ...] = (96, 128, 160)  # sequence buckets of the policy and PRM training
    critic_buckets: tuple[int, ...] = (256, 320, 384)  # --judge critic's (its examples hold a critique too)
    critic_hidden_size: int = 0  # the critic's width and depth (0: the policy's); intermediate 3x the width
    critic_layers: int = 0
    prm_class_balance: bool = False  # PRM loss: wrong and right steps weighted by inverse frequency
    label_temperature: float = 0.7  # the solutions to label (held-out samples stay at 0.7)
    rollout_temperature: float = 0.7  # MC rollouts: hotter makes the completer less reliable, MC noisier
    policy_error_kinds: tuple[str, ...] = ()  # the kinds injected into its training solutions; () = all
    search_problems: int = 16  # held-out problems the search stage searches (with the consensus PRM)
    search_n: int = 4  # N of weighted best-of-N, beam search and majority vote there
    search_beam_width: int = 2  # M: beam search keeps N/M beams and expands each M ways


SIZES = {
    # Single-digit values: arithmetic a 2-layer model learns in a few hundred steps on a CPU.
    "tiny": DemoSize(world="tiny", world_overrides=dict(max_start=9, max_operand=5, max_value=9),
                     model=dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2),
                     vocab_size=384,
                     policy_problems=3000, policy_steps=300, policy_batch=16, critic_problems=600, critic_steps=300,
                     label_problems=48, samples_per_problem=4, rollouts=6, prm_steps=80, prm_batch=16, heldout_problems=100,
                     bon_n=4),
    # The recipe whose PRMs learn to check steps (experiments/notes/2026-11-27-demo-small-checks-steps.md): each step
    # restates the sentence it applies, the policy is taught the errors a PRM of this size can learn
    # to find (wrong operations, skipped steps), and 8x the labels train PRMs in batches of 64. (RoPE
    # base 1e4 instead of Qwen2's 1e6 was measured, no better: experiments/notes/2026-11-27-demo-small-variations.md.)
    # MC's failure modes by construction (issue 28): half the policy's early errors are followed by a
    # restart that re-derives the answer, and 30% of its solutions carry a check step (a quantity the
    # answer never uses), so MC passes wrong steps the way the paper describes; the critic learns both.
    # The critic is 4 x 128 (~5x the policy's parameters), as the paper's 72B judge is larger than its 7B policy.
    "small": DemoSize(world="tiny", world_overrides=dict(max_start=9, max_operand=5, max_value=9, restate=True,
                                                         restart_rate=0.5, check_rate=0.3),
                      model=dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2),
                      vocab_size=1024, policy_problems=3000, policy_steps=800, policy_batch=16, critic_problems=600,
                      critic_steps=800, label_problems=400, samples_per_problem=4, rollouts=6, prm_steps=300,
                      prm_batch=64, heldout_problems=100, bon_n=4, policy_error_rate=0.4, critic_hidden_size=128,
                      critic_layers=4,
                      policy_error_kinds=("wrong_operation", "skipped_step"), max_new_tokens=128,
                      buckets=(112, 144, 176), critic_buckets=(176, 208, 240), search_problems=100, search_n=8,
                      search_beam_width=4),
}


def resize(size: DemoSize, assignments: Sequence[str]) -> DemoSize:
    """`prm-jax demo --set`: `field=value` for a DemoSize field, `world.key=value` for a WorldConfig
    one, `model.key=value` for a model one (values parsed as YAML: 800, 0.4, true, [128, 192])."""
    hints = typing.get_type_hints(DemoSize)
    plain = {name: hint for name, hint in hints.items() if name not in ("world", "world_overrides", "model")}
    world_hints = typing.get_type_hints(WorldConfig)
    model_hints = typing.get_type_hints(Qwen2Config)
    changes, world, model = {}, dict(size.world_overrides), dict(size.model)
    for a in assignments:
        key, sep, text = (part.strip() for part in a.partition("="))
        if not sep:
            raise InputError(f"--set {a!r}: expected key=value")
        value = yaml.safe_load(text)
        section, _, name = key.rpartition(".")
        if section == "world" and name in world_hints:
            world[name] = coerce(value, world_hints[name], f"--set {key}")
        elif section == "model" and name in model_hints and name not in DEMO_SETS_MODEL:
            model[name] = coerce(value, model_hints[name], f"--set {key}")
        elif not section and name in plain:
            changes[name] = coerce(value, plain[name], f"--set {key}")
        else:
            raise InputError(f"--set {key}: unknown key; expected one of {', '.join(plain)}, world.<WorldConfig "
                             f"field> or model.<Qwen2Config field but {' and '.join(DEMO_SETS_MODEL)}>")
    resized = dataclasses.replace(size, world_overrides=world, model=model, **changes)
    unknown = [k for k in resized.policy_error_kinds if k not in ERROR_KINDS]
    if unknown:
        raise InputError(f"--set policy_error_kinds: unknown error kind(s) {unknown}; expected some of {ERROR_KINDS}")
    try:  # a bad world fails here, not stages later
        WorldConfig.for_size(resized.world, **world)
    except (TypeError, ValueError) as e:
        raise InputError(f"--set world.*: {e}") from None
    return resized


@dataclasses.dataclass(frozen=True)
class Judge:
    kind: str = "rederive"  # rederive | critic | simulated | endpoint
    error_rate: float = 0.2  # simulated only
    endpoint: str | None = None
    api: str = "sglang"
    model: str | None = None
    tokenizer: str | None = None


class Demo:
    def __init__(self, out: str, size: DemoSize, judge: Judge, seed: int, quiet: bool):
        self.out, self.size, self.judge, self.seed, self.quiet = out, size, judge, seed, quiet

    @classmethod
    def load(cls, out: str, quiet: bool = True) -> "Demo":
        """The demo run in `out`, with the size, judge and seed it was started with."""
        settings = load_json(os.path.join(out, SETTINGS_FILE))
        size = resize(SIZES[settings["size"]], settings.get("set", []))
        return cls(out, size, Judge(**settings["judge"]), settings["seed"], quiet)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def cli(self, *argv: str) -> None:
        """Run one `prm-jax` subcommand in-process, as a user would type it."""
        from prm_jax.cli import main

        argv = [str(a) for a in argv]
        print(f"\n$ prm-jax {' '.join(argv)}", flush=True)
        rc = main(argv)
        if rc:
            raise RunError(f"prm-jax {argv[0]} exited with {rc}")

    def train(self, objective: str, train_file: str, out: str, steps: int, lr: float, *, init: str | None = None,
              system_prompt: str | None = "default", batch: int = 16, buckets: tuple[int, ...] | None = None,
              overrides: tuple[str, ...] = (), eval_file: str | None = None, model_yaml: str = "model.yaml") -> None:
        buckets = buckets or self.size.buckets
        args = ["train", "--objective", objective, "--train", train_file, "--out", out,
                "--set", f"steps={steps}", "--set", f"lr={lr}", "--set", f"batch_size={batch}",
                "--set", f"max_length={max(buckets)}", "--set", f"buckets={list(buckets)}",
                "--set", f"warmup_steps={min(20, steps // 5)}", "--set", "min_lr_ratio=0.1",
                "--set", f"seed={self.seed}", "--set", f"save_every={max(steps // 2, 1)}", "--set", "log_every=25"]
        if eval_file:
            args += ["--eval", eval_file]
        if init:
            args += ["--init", init]
        else:
            args += ["--init-config", self.path(model_yaml), "--tokenizer", self.path("tokenizer")]
        if system_prompt is None:
            args += ["--set", "system_prompt="]
        for kv in overrides:
            args += ["--set", kv]
        if self.quiet:
            args.append("--quiet")
        self.cli(*args)

    def sample(self, problems: str, out: str, n: int, seed: int, batch_size: int = 32,
               temperature: float = 0.7) -> None:
        """`prm-jax sample`: the policy's `n` solutions per problem, at the demo's sampling settings."""
        self.cli("sample", "--policy", self.path("policy", "hf"), "--problems", problems, "--out", out, "--n", n,
                 "--temperature", temperature, "--top-p", 1.0, "--max-new-tokens", self.size.max_new_tokens,
                 "--seed", seed, "--batch-size", batch_size)

    # -- stages ------------------------------------------------------------------------------
    def stage_world(self) -> None:
        cfg = world.WorldConfig.for_size(self.size.world, **self.size.world_overrides)
        s, seed = self.size, self.seed
        template = critic.toy_judge_template()
        # dev: the held-out set's twin on which each PRM's threshold is tuned (ProcessBench's GSM8K).
        sets = {"policy": s.policy_problems, "critic": s.critic_problems, "label": s.label_problems,
                "heldout": s.heldout_problems, "dev": s.heldout_problems}
        problems = {}
        for i, (name, n) in enumerate(sets.items()):
            problems[name] = world.generate_problems(n, seed=seed * 100 + i, cfg=cfg, id_prefix=name)
        # Problems are drawn at random, so keep each set disjoint from those before it.
        seen = {p["problem"] for p in problems["policy"]} | {p["problem"] for p in problems["critic"]}
        for name in ("label", "heldout", "dev"):
            problems[name] = [p for p in problems[name] if p["problem"] not in seen]
            seen |= {p["problem"] for p in problems[name]}
        os.makedirs(self.path("data"), exist_ok=True)
        for name, recs in problems.items():
            write_jsonl(self.path("data", f"{name}_problems.jsonl"), recs)
        corpus = world.tokenizer_corpus(400, seed=seed, cfg=cfg, extra_texts=critic.judge_corpus_texts(template))
        train_tokenizer(corpus, self.path("tokenizer"), vocab_size=s.vocab_size)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(self.path("tokenizer")))
        model = {"preset": "tiny", **s.model, "vocab_size": vocab, "max_position_embeddings": 1024}
        with open(self.path("model.yaml"), "w", encoding="utf-8") as f:
            json.dump(model, f)
        critic_model = dict(model)
        if s.critic_hidden_size:
            critic_model.update(hidden_size=s.critic_hidden_size, intermediate_size=3 * s.critic_hidden_size)
        if s.critic_layers:
            critic_model["num_layers"] = s.critic_layers
        with open(self.path("critic_model.yaml"), "w", encoding="utf-8") as f:
            json.dump(critic_model, f)
        # The policy learns from reference solutions with a few injected errors, so that its own
        # samples go wrong in varied places; the re-deriving critic from right solutions (other draws
        # than the policy's), the critiquing one from solutions with true verdicts.
        # MC's failure modes are the world's shares (restarts, checks, slips), in both training sets.
        shares = world.failure_shares(cfg)
        policy = world.sample_solutions(problems["policy"], seed=seed, error_rate=s.policy_error_rate,
                                        kinds=s.policy_error_kinds or world.ERROR_KINDS, **shares)
        def solutions(records):
            return [{"id": r["id"], "problem": r["problem"], "steps": r["steps"]} for r in records]

        write_jsonl(self.path("data", "policy_train.jsonl"), solutions(policy))
        if self.judge.kind == "rederive":
            right = world.sample_solutions(problems["policy"] + problems["critic"], seed=seed + 1, error_rate=0.0,
                                           check_rate=shares.get("check_rate", 0.0))
            write_jsonl(self.path("data", "critic_train.jsonl"), solutions(right))
        else:
            examples = critic.critic_training_set(problems["critic"], template, seed=seed, error_rate=0.6, **shares)
            write_jsonl(self.path("data", "critic_train.jsonl"),
                        [{"id": e["id"], "prompt": e["messages"][-2]["content"], "text": e["messages"][-1]["content"]}
                         for e in examples])

    def stage_policy(self) -> None:
        s = self.size
        self.train("lm", self.path("data", "policy_train.jsonl"), self.path("policy"), s.policy_steps, s.lr,
                   batch=s.policy_batch)

    def stage_sample(self) -> None:
        self.sample(self.path("data", "label_problems.jsonl"), self.path("solutions.jsonl"),
                    self.size.samples_per_problem, self.seed, temperature=self.size.label_temperature)

    def stage_rollout(self) -> None:
        self.cli("rollout", "--policy", self.path("policy", "hf"), "--solutions", self.path("solutions.jsonl"),
                 "--out", self.path("mc.jsonl"), "--n", self.size.rollouts, "--mode", "all",
                 "--temperature", self.size.rollout_temperature,
                 "--top-p", 1.0, "--max-new-tokens", 2 * self.size.max_new_tokens // 3, "--seed", self.seed,
                 "--batch-size", 32, "--max-prefixes", 128)

    def stage_critic(self) -> None:
        if self.judge.kind not in ("rederive", "critic"):
            return
        s, critiques = self.size, self.judge.kind == "critic"  # a critique is a reply to the judge prompt
        self.train("lm", self.path("data", "critic_train.jsonl"), self.path("critic"), s.critic_steps, s.lr,
                   system_prompt=None if critiques else "default", batch=16,
                   buckets=s.critic_buckets if critiques else None, model_yaml="critic_model.yaml")

    def stage_judge(self) -> None:
        out = self.path("judge.jsonl")
        if self.judge.kind == "simulated":
            write_jsonl(out, truth.simulated_judge(read_jsonl(self.path("solutions.jsonl")), self.judge.error_rate,
                                             self.seed))
            return
        if self.judge.kind == "rederive":
            self.rederive_judge(out)
            return
        common = ["judge", "--solutions", self.path("solutions.jsonl"), "--out", out, "--max-new-tokens", 160]
        if self.judge.kind == "critic":
            self.cli(*common, "--api", "local", "--model", self.path("critic", "hf"),
                     "--template", critic.toy_judge_template_path(), "--batch-size", 64, "--temperature", 0)
        else:
            args = [*common, "--api", self.judge.api, "--endpoint", self.judge.endpoint,
                    "--template", critic.toy_judge_template_path()]
            if self.judge.model:
                args += ["--model", self.judge.model]
            if self.judge.tokenizer:
                args += ["--tokenizer", self.judge.tokenizer]
            self.cli(*args)

    def rederive_judge(self, out: str) -> None:
        from transformers import AutoTokenizer

        from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT
        from prm_jax.models.hf import load_causal_lm
        from prm_jax.sampling.commands import progress_bar
        from prm_jax.toyworld.rederive import model_continuer, rederive_judge

        critic_dir = self.path("critic", "hf")
        solutions = read_jsonl(self.path("solutions.jsonl"))
        continuer = model_continuer(load_causal_lm(critic_dir), AutoTokenizer.from_pretrained(critic_dir),
                                    DEFAULT_SYSTEM_PROMPT)
        t0 = time.perf_counter()
        with progress_bar(len(solutions), "judge (critic re-derives each step)", self.quiet) as bar:
            records = rederive_judge(solutions, continuer, critic_dir, bar.update)
        write_jsonl(out, records)
        flagged = sum(r["judge"]["first_error"] is not None and r["judge"]["first_error"] >= 0 for r in records)
        print(f"judge: {len(records)} solutions judged in {time.perf_counter() - t0:.1f} s, {flagged} with an error "
              f"-> {out}")

    def stage_filter(self) -> None:

        self.cli("filter", "--mc", self.path("mc.jsonl"), "--judge", self.path("judge.jsonl"),
                 "--out", self.path("train_consensus.jsonl"), "--report", self.path("consensus_report.json"))
        # The comparison sets: every solution, labelled by one source alone.
        mc = [training_record(r, r["mc"]["first_error"]) for r in read_jsonl(self.path("mc.jsonl"))]
        judged = [training_record(r, r["judge"]["first_error"]) for r in read_jsonl(self.path("judge.jsonl"))
                  if r["judge"]["first_error"] is not None]
        write_jsonl(self.path("train_mc.jsonl"), mc)
        write_jsonl(self.path("train_judge.jsonl"), judged)

    def stage_prm(self, label_set: str) -> None:
        s = self.size
        train_file = self.path(f"train_{label_set}.jsonl")
        if not read_jsonl(train_file):
            raise RunError(f"{train_file} is empty: no solution survived labelling with {label_set!r}")
        self.train("prm", train_file, self.path(f"prm_{label_set}"), s.prm_steps, s.prm_lr,
                   init=self.path("policy", "hf"), batch=s.prm_batch,
                   overrides=("class_balance=true",) if s.prm_class_balance else ())

    def stage_heldout(self) -> None:
        """Two ProcessBench-style sets of fresh policy samples labelled by the truth: `toy`, on which
        the PRMs are scored, and `dev`, on other problems, on which each PRM's threshold is tuned."""
        os.makedirs(self.path("heldout"), exist_ok=True)
        for subset, prefix, seed in (("toy", "heldout", self.seed), ("dev", "dev", self.seed + 10)):
            problem_file = self.path("data", f"{prefix}_problems.jsonl")
            # the held-out samples are Best-of-N's too; the more ones are not (that keeps bon_n per problem)
            records = self.labelled_samples(problem_file, self.path(f"{prefix}_samples.jsonl"), self.size.bon_n,
                                            seed + 1)
            more = functools.partial(self.labelled_samples, problem_file, self.path(f"{prefix}_more_samples.jsonl"),
                                     4 * self.size.bon_n, seed + 4)
            chosen = heldout.balanced_set(records, read_jsonl(problem_file), seed, more)
            with open(self.path("heldout", f"{subset}.json"), "w", encoding="utf-8") as f:
                json.dump(chosen, f)

    def labelled_samples(self, problem_file: str, out: str, n: int, seed: int) -> list[dict]:
        """The policy's `n` samples per problem (written to `out`) as ProcessBench records with their true labels."""
        self.sample(problem_file, out, n, seed)
        return heldout.processbench_records(read_jsonl(out))

    def stage_eval(self, label_set: str) -> None:
        prm = self.path(f"prm_{label_set}", "hf")
        # f32 whatever the CPU (eval's default is bf16 on CPUs with AMX), so a seed's figures do not depend on it
        common = ("--batch-size", 32, "--max-length", 256, "--scoring-dtype", "float32")
        self.cli("eval", "processbench", "--prm", prm, "--data", self.path("heldout"), "--subsets", "dev,toy",
                 "--threshold", "tune", "--tune-on", "dev", "--out", self.path(f"eval_{label_set}"), *common)
        self.cli("eval", "bon", "--prm", prm, "--responses", self.path("heldout_samples.jsonl"),
                 "--out", self.path(f"bon_{label_set}"), *common)

    def stage_search(self) -> None:
        """Weighted best-of-N and step-level beam search with the consensus PRM on held-out problems, each
        beside the majority vote over the same N candidates (search-and-learn's setting: a step ends at a
        blank line). A candidate's score is its lowest step score (agg min), not search-and-learn's last step's:
        our PRMs train on steps up to the first error only, so a step after a wrong one has no trained score (the
        demo's beams kept children of a step scored 0.025 whose own step scored 0.998)."""
        s = self.size
        problems = read_jsonl(self.path("data", "heldout_problems.jsonl"))[: s.search_problems]
        if not problems:
            return
        chosen = self.path("data", "search_problems.jsonl")
        write_jsonl(chosen, problems)
        for strategy in ("best-of-n", "beam"):
            args = ["search", "--policy", self.path("policy", "hf"), "--prm", self.path("prm_consensus", "hf"),
                    "--problems", chosen, "--out", self.path("search"), "--strategy", strategy, "--n", s.search_n,
                    "--beam-width", s.search_beam_width, "--agg", "min", "--max-steps", 10, "--max-tokens", 64,
                    "--temperature", 0.7, "--seed", self.seed, "--batch-size", 16, "--prm-batch-size", 64,
                    "--prm-max-length", 256, "--grade-workers", 0]
            self.cli(*args, *(["--no-progress"] if self.quiet else []))

    def stage_report(self) -> None:
        judge = self.judge.kind + (f" (error rate {self.judge.error_rate})" if self.judge.kind == "simulated" else "")
        rep = toy_report.build_report(self.path, size=load_json(self.path(SETTINGS_FILE))["size"],
                                      world={"preset": self.size.world, **self.size.world_overrides}, seed=self.seed,
                                      judge=judge, label_sets=LABEL_SETS)
        with open(self.path("report.json"), "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2)
        toy_report.write_markdown(rep, self.path("report.md"))
        toy_report.plot_report(rep, self.out)
        print("\n" + toy_report.summary_table(rep))
        print(f"\nreport: {self.path('report.md')} (and report.json, report_*.png)")

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        table = {"world": self.stage_world, "policy": self.stage_policy, "sample": self.stage_sample,
                 "rollout": self.stage_rollout, "critic": self.stage_critic, "judge": self.stage_judge,
                 "filter": self.stage_filter, "heldout": self.stage_heldout, "search": self.stage_search,
                 "report": self.stage_report}
        for ls in LABEL_SETS:
            table[f"prm-{ls}"] = lambda ls=ls: self.stage_prm(ls)
            table[f"eval-{ls}"] = lambda ls=ls: self.stage_eval(ls)
        return [(name, table[name]) for name in STAGES]


def _compilation_cache(path: str) -> None:
    """Persist compiled programs: the three PRMs (and their evaluations) share every shape, and a
    resumed run skips compiles done before the stop."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_demo(out: str, *args, **kwargs) -> dict[str, Any]:
    """`_run_demo` holding the run directory's lock: a second run on it stops before touching it."""
    os.makedirs(out, exist_ok=True)
    with OutputLock(out, os.path.join(out, LOCK_FILE)):
        return _run_demo(out, *args, **kwargs)


def _run_demo(out: str, size: str = "small", judge: Judge = Judge(), seed: int = 0, resume: bool = False,
              quiet: bool = False, assignments: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or with `resume`, continue) the demo, its size changed by `assignments` (see `resize`);
    returns the report."""
    demo = Demo(out, resize(SIZES[size], assignments), judge, seed, quiet)
    done_dir = os.path.join(out, "stages")
    if os.path.isdir(done_dir) and os.listdir(done_dir) and not resume:
        raise InputError(f"{out} already holds a demo run; pass --resume to continue it or choose a new --out")
    os.makedirs(done_dir, exist_ok=True)
    _compilation_cache(os.path.join(out, ".jax_cache"))
    settings = {"size": size, "judge": dataclasses.asdict(judge), "seed": seed}
    if assignments:
        settings["set"] = list(assignments)
    settings_path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(settings_path) and load_json(settings_path) != settings:
        raise InputError(f"{settings_path}: this run used {load_json(settings_path)}; resume it with the same "
                         "options or choose a new --out")
    with open(settings_path, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    timings = {}
    t_start = time.perf_counter()
    for name, fn in demo.stages():
        marker = os.path.join(done_dir, name)
        if os.path.exists(marker):
            print(f"[demo] {name}: done earlier, skipped")
            continue
        print(f"\n[demo] === {name} ===", flush=True)
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        with open(marker, "w", encoding="utf-8") as f:
            f.write(f"{timings[name]}\n")
    print(f"\n[demo] finished in {time.perf_counter() - t_start:.0f} s; stage seconds: {timings}")
    return load_json(os.path.join(out, "report.json"))


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole recipe end to end on a toy world whose truth is known",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory (every stage writes its files here)")
    p.add_argument("--size", choices=tuple(SIZES), default="small",
                   help="small (the default): the recipe that shows the paper's lessons, MC's failure modes built in, "
                        "~10 min on 2 CPU cores; tiny: the whole pipeline in ~3 min, for tests and CI")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last finished stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", choices=("rederive", "critic", "simulated"), default="rederive",
                   help="rederive: a critic model trained here re-derives each step without seeing it; "
                        "critic: a critic model trained here writes ProcessBench critiques, run through "
                        "`prm-jax judge`'s in-process backend (one this small copies the step it checks); "
                        "simulated: the truth with injected errors")
    p.add_argument("--judge-error-rate", type=unit_interval, default=0.2, help="with --judge simulated")
    p.add_argument("--judge-endpoint", help="a real judge server instead (SGLang or OpenAI-compatible)")
    p.add_argument("--judge-api", choices=("sglang", "openai"), default="sglang")
    p.add_argument("--judge-model", help="model name for --judge-endpoint")
    p.add_argument("--judge-tokenizer", help="judge tokenizer directory (sglang: its chat template)")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the training stages")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the size preset, e.g. --set policy_steps=800 --set world.restate=true "
                        "(DemoSize fields, world.<WorldConfig field>, model.<field>)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.judge_endpoint:
        judge = Judge("endpoint", endpoint=args.judge_endpoint, api=args.judge_api, model=args.judge_model,
                      tokenizer=args.judge_tokenizer)
    else:
        judge = Judge(args.judge, error_rate=args.judge_error_rate)
    resize(SIZES[args.size], args.set)  # a bad --set fails here, before the run directory is made
    run_demo(args.out, args.size, judge, args.seed, args.resume, args.quiet, args.set)
    return 0
