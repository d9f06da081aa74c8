"""PRM training throughput: our jitted JAX step vs a raw PyTorch loop vs TRL's PRMTrainer, same run.

All three train the benchmark model (Qwen2Config.preset("small"): vocab 32000, hidden 512, 8 layers, 8 heads,
2 kv heads, intermediate 1408) as a 2-class token classifier in float32 with AdamW (lr 1e-5) and
global-norm clipping 1.0, batch 8, max length 512, on the same records: ProcessBench GSM8K solutions
turned into training records (steps up to the first error; 1 before it, 0 at it). Each part runs in
its own process so its peak memory (max RSS) is its own.

- jax:   prm_jax.training.step.make_train_step on one CPU device; batches from our pipeline
         (chat template + step token ids), each batch padded to the next multiple of 64 (one
         compilation per length; the compilations and one warm-up step per length are not timed);
         logits read at the step tokens alone, as the trainer does (pipeline.with_score_positions).
- torch: transformers Qwen2ForTokenClassification(num_labels=2) + torch.optim.AdamW, the very same
         token ids and labels, each batch padded to its longest row (the HF collator's choice).
- trl:   trl.PRMTrainer (trl==0.24.0, installed only in its own venv, e.g.
         python -m venv --system-site-packages /tmp/bench-trl && /tmp/bench-trl/bin/pip install trl==0.24.0 datasets)
         on the same records in TRL's stepwise format; it tokenises them itself (no chat template, so
         its rows are somewhat shorter: throughput is compared per real token). In float32 like the
         others (bf16=False: PRMConfig's default is bf16 autocast, which on a CPU with AMX runs
         oneDNN's bf16 matmuls); that default is timed too and printed on its own line.

Every part runs in the environment `prm-jax train` gives itself: glibc backing large allocations
with huge pages (prm_jax.hugepages; it spares XLA:CPU's per-step page faults and
changes little for torch, whose allocator reuses its memory).

Throughput = real (non-padding) tokens / step wall time, median over the timed steps (compilation
and warm-up steps excluded); with --rounds N every part runs N times in rotation and the median is
over all N rounds' steps. MFU on a GPU: experiments/gpu_check.py.

    python experiments/bench_train.py [--steps 3] [--rounds 1] [--trl-python /tmp/bench-trl/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROCESSBENCH = os.path.join(REPO, "..", "shared", "data", "processbench", "gsm8k.json")
BATCH, MAX_LEN, LR = 8, 512, 1e-5


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- shared data ----------------------------------------------------------------------------------

def prepare(work: str, n_records: int) -> None:
    """Training records from ProcessBench GSM8K + a byte-level BPE tokenizer trained on them."""
    from prm_jax.toyworld.tokenizer import train_tokenizer

    with open(PROCESSBENCH, encoding="utf-8") as f:
        bench = json.load(f)
    records = []
    for r in bench[:n_records]:
        k = r["label"]
        steps = r["steps"] if k < 0 else r["steps"][:k + 1]
        labels = [1] * len(steps) if k < 0 else [1] * k + [0]
        records.append({"id": r["id"], "problem": r["problem"], "steps": steps, "labels": labels})
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "records.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    texts = [r["problem"] for r in bench] + [s for r in bench for s in r["steps"]]
    train_tokenizer(texts, os.path.join(work, "tokenizer"), vocab_size=8000)


def encoded_batches(work: str, n_batches: int):
    """Our pipeline's examples, in file order, grouped into batches of BATCH."""
    from transformers import AutoTokenizer

    from prm_jax.data import pipeline as pl
    from prm_jax.data.prm_format import resolve_step_token

    tok = AutoTokenizer.from_pretrained(os.path.join(work, "tokenizer"))
    opts = pl.EncodeOptions(objective="prm", max_length=MAX_LEN, step_token_id=resolve_step_token(tok),
                            step_token_text="<extra_0>")
    enc = pl.encode_records(tok, os.path.join(work, "records.jsonl"), opts)
    exs = enc.examples
    if len(exs) < n_batches * BATCH:
        raise SystemExit(f"need {n_batches * BATCH} records, have {len(exs)}")
    return [exs[i * BATCH:(i + 1) * BATCH] for i in range(n_batches)], tok.pad_token_id


# -- parts ----------------------------------------------------------------------------------------

def part_jax(work: str, steps: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from prm_jax.data import pipeline as pl
    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config
    from prm_jax.parallel import mesh as pmesh
    from prm_jax.training import step as ts
    from prm_jax.training.config import apply_overrides, TrainConfig

    groups, pad = encoded_batches(work, steps)
    cfg = Qwen2Config.preset("small")
    mesh = pmesh.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tcfg = apply_overrides(TrainConfig(), [f"lr={LR}", "warmup_steps=0", "steps=1000", "clip_norm=1.0"])
    model = Qwen2PRM(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    psh = nnx.to_pure_dict(pmesh.state_shardings(state, mesh))
    params = jax.device_put(nnx.to_pure_dict(state), psh)
    del model, state
    tx = ts.make_optimizer(tcfg)
    osh, _ = ts.opt_state_shardings(tx, params, psh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=osh)(params)
    step = ts.make_train_step(graphdef, "prm", tx, mesh, psh, osh)
    compiled = {}

    def timed(batches):
        """Real tokens/s of each batch, read at its step tokens as the trainer does. Every new shape
        is compiled ahead and run once untimed (like torch's and TRL's warm-up steps)."""
        nonlocal params, opt_state
        batches = [pl.with_score_positions(b) for b in batches]
        shape = lambda b: (b["input_ids"].shape[1], b["score_positions"].shape[1])  # noqa: E731
        for b in batches:
            if shape(b) not in compiled:
                compiled[shape(b)] = step.lower(params, opt_state, pl.place_batch(b, mesh)).compile()
                params, opt_state, m = compiled[shape(b)](params, opt_state, pl.place_batch(b, mesh))
                jax.block_until_ready(m["loss"])
        rates = []
        for b in batches:
            real = int((b["segment_ids"] > 0).sum())
            t = time.perf_counter()
            params, opt_state, m = compiled[shape(b)](params, opt_state, pl.place_batch(b, mesh))
            float(m["loss"])  # waits for the step
            rates.append(real / (time.perf_counter() - t))
        fill = float(np.mean([(b["segment_ids"] > 0).mean() for b in batches]))
        return {"tokens_per_s": statistics.median(rates), "rates": rates, "fill": fill}

    buckets = tuple(range(64, MAX_LEN + 1, 64))  # <= 63 padding slots per row beyond the batch's longest
    padded = timed([pl.pad_examples(g, buckets, pad) for g in groups])
    # The same records batched by our pipeline's length grouping (one window over all of them).
    pool = [e for g in groups for e in g]
    order = pl.length_grouped_order(np.array([len(e["input_ids"]) for e in pool]), seed=0, epoch=0,
                                    batch_rows=BATCH, window=len(groups))
    grouped = timed([pl.pad_examples([pool[i] for i in order[k:k + BATCH]], buckets, pad)
                     for k in range(0, len(pool), BATCH)])
    # The same records first-fit packed into full 512-token rows with segment ids (our pipeline's
    # packing; attention stays within each example), one shape.
    import grain
    it = pl.packed_batches(grain.MapDataset.source(pool).to_iter_dataset(), batch_rows=BATCH, max_length=MAX_LEN,
                           pad_id=pad, drop_remainder=False)
    def fill_rows(b):  # the packer's last group can have fewer rows: add empty ones
        n = BATCH - b["input_ids"].shape[0]
        pad_to = {"input_ids": pad, "labels": pl.IGNORE, "segment_ids": 0, "positions": 0}
        return {k: np.concatenate([v, np.full((n, v.shape[1]), pad_to[k], v.dtype)]) for k, v in b.items()}

    packed = timed([fill_rows(b) for b in it])
    return {**padded, "peak_rss_mib": peak_rss_mib(), "grouped": grouped, "packed": packed,
            "tokens_per_row": sum(len(e["input_ids"]) for e in pool) / len(pool)}


def _torch_model():
    import torch
    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForTokenClassification

    from prm_jax.models.qwen2 import Qwen2Config

    torch.manual_seed(0)
    hf = dict(Qwen2Config.preset("small").to_hf())
    hf.update(num_labels=2, architectures=["Qwen2ForTokenClassification"], pad_token_id=0)
    return Qwen2ForTokenClassification(HFQwen2Config(**hf)).float()


def part_torch(work: str, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch

    groups, pad = encoded_batches(work, steps)
    groups = groups[:1] * warmup + groups  # warm up on the first batch, then time the same batches as jax
    model = _torch_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def collate(g):
        width = max(len(e["input_ids"]) for e in g)
        ids = np.full((len(g), width), pad, np.int64)
        lab = np.full((len(g), width), -100, np.int64)
        mask = np.zeros((len(g), width), np.int64)
        for r, e in enumerate(g):
            n = len(e["input_ids"])
            ids[r, :n], lab[r, :n], mask[r, :n] = e["input_ids"], e["labels"], 1
        return torch.from_numpy(ids), torch.from_numpy(lab), torch.from_numpy(mask)

    rates = []
    for i, g in enumerate(groups):
        ids, lab, mask = collate(g)
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=lab)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if i >= warmup:
            rates.append(int(mask.sum()) / (time.perf_counter() - t))
    return {"tokens_per_s": statistics.median(rates), "rates": rates, "peak_rss_mib": peak_rss_mib(), "loss": loss,
            "threads": torch.get_num_threads(),
            "tokens_per_row": float(np.mean([len(e["input_ids"]) for g in groups[warmup:] for e in g]))}


def part_trl(work: str, steps: int, warmup: int, bf16: bool = False) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(os.path.join(work, "tokenizer"))
    rows = [json.loads(line) for line in open(os.path.join(work, "records.jsonl"), encoding="utf-8")]
    rows = rows[:BATCH] * warmup + rows[:steps * BATCH]  # warm-up batch, then the batches jax times
    ds = datasets.Dataset.from_list([{"prompt": r["problem"], "completions": r["steps"],
                                      "labels": [bool(y) for y in r["labels"]]} for r in rows])
    model = _torch_model()
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    class CountingPRMTrainer(trl.PRMTrainer):
        def _get_train_sampler(self, *a, **kw):  # file order, so the timed batches are the jax ones
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *a, **kw):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *a, **kw)

    args = trl.PRMConfig(output_dir=os.path.join(work, "trl_out"), per_device_train_batch_size=BATCH,
                         max_steps=steps + warmup, learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
                         lr_scheduler_type="constant", max_length=MAX_LEN, step_separator="\n",
                         train_on_last_step_only=False, report_to=[], save_strategy="no", logging_steps=1000,
                         use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=bf16)
    trainer = CountingPRMTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 callbacks=[Timer()])
    trainer.train()
    rates = [n / t for n, t in zip(tokens[warmup:], times[warmup:])]
    return {"tokens_per_s": statistics.median(rates), "rates": rates, "peak_rss_mib": peak_rss_mib(),
            "trl": trl.__version__, "threads": torch.get_num_threads(),
            "tokens_per_row": statistics.mean(tokens[warmup:]) / BATCH}


# -- driver ---------------------------------------------------------------------------------------

def run_part(python: str, part: str, args, timeout: int = 900) -> dict:
    cmd = [python, os.path.abspath(__file__), "--part", part, "--work", args.work, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    from prm_jax.hugepages import hugepage_malloc_env

    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TOKENIZERS_PARALLELISM": "false"}
    env = hugepage_malloc_env(env, platform.libc_ver()) or env  # as `prm-jax` runs; the same for every part
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)}


def pooled(results: list[dict]) -> dict:
    """One part's rounds as one result: every round's per-step rates pooled, median over them all."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    out = {**results[0], "rates": [x for r in results for x in r["rates"]]}
    out["tokens_per_s"] = statistics.median(out["rates"])
    if "peak_rss_mib" in out:
        out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    for variant in ("grouped", "packed"):  # the jax part's other batchings
        if variant in out:
            out[variant] = pooled([r[variant] for r in results])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("jax", "torch", "trl", "trl-bf16"))
    ap.add_argument("--work", default="/tmp/prm_bench_train")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (torch, trl)")
    ap.add_argument("--rounds", type=int, default=1, help="run every part this many times, in rotation")
    ap.add_argument("--trl-python", default="/tmp/bench-trl/bin/python",
                    help="python of the venv that has trl==0.24.0")
    args = ap.parse_args()

    if args.part:
        res = {"jax": lambda: part_jax(args.work, args.steps),
               "torch": lambda: part_torch(args.work, args.steps, args.warmup),
               "trl": lambda: part_trl(args.work, args.steps, args.warmup),
               "trl-bf16": lambda: part_trl(args.work, args.steps, args.warmup, bf16=True)}[args.part]()
        print("RESULT " + json.dumps(res))
        return

    prepare(args.work, n_records=args.steps * BATCH)
    print(f"PRM train step, Qwen2Config.preset('small') (vocab 32000, h512, 8 layers), f32, batch {BATCH}, "
          f"max length {MAX_LEN}, {args.steps} timed steps x {args.rounds} rounds (median), ProcessBench-GSM8K "
          "records, CPU")
    pythons = {"jax": sys.executable, "torch": sys.executable, "trl": args.trl_python, "trl-bf16": args.trl_python}
    runs: dict[str, list[dict]] = {k: [] for k in pythons}
    for _ in range(args.rounds):  # in rotation, so a change in the machine's load falls on every part alike
        for part, python in pythons.items():
            if python == args.trl_python and not os.path.exists(python):
                runs[part].append({"error": f"{python} not found; create the venv: python -m venv "
                                   "--system-site-packages /tmp/bench-trl && /tmp/bench-trl/bin/pip install "
                                   "trl==0.24.0 datasets"})
            else:
                runs[part].append(run_part(python, part, args))
    res = {k: pooled(v) for k, v in runs.items()}
    j = res["jax"]
    ours = {} if "error" in j else {"padded": j, "grouped": j["grouped"], "packed": j["packed"]}
    labels = {"padded": "padded to x64", "grouped": "length-grouped, padded to x64", "packed": "packed 512-rows"}
    if "error" in j:
        print(f"  prm_jax could not run: {j['error']}")
    for v, r in ours.items():
        extra = (f"peak RSS {j['peak_rss_mib']:6.0f} MiB   {j['tokens_per_row']:.0f} tokens/row" if v == "padded"
                 else "(same process)")
        print(f"  {'prm_jax jit step, ' + labels[v] + ' (fill ' + format(r['fill'], '.0%') + ')':58s} "
              f"{r['tokens_per_s']:7.0f} real tokens/s   {extra}")
    names = {"torch": "torch loop (HF Qwen2ForTokenClassification + AdamW)", "trl": "TRL 0.24.0 PRMTrainer",
             "trl-bf16": "TRL 0.24.0 PRMTrainer, its default bf16 autocast"}
    for k in ("torch", "trl", "trl-bf16"):
        r = res[k]
        if "error" in r:
            print(f"  {names[k]:58s} could not run: {r['error']}")
            continue
        ratio = ", ".join(f"{v}/this = {o['tokens_per_s'] / r['tokens_per_s']:.2f}x" for v, o in ours.items())
        print(f"  {names[k]:58s} {r['tokens_per_s']:7.0f} real tokens/s   peak RSS {r['peak_rss_mib']:6.0f} MiB   "
              f"{r['tokens_per_row']:.0f} tokens/row   {ratio}")
    for k, want in (("torch", 0.8), ("trl", 1.5)):
        if ours and "error" not in res[k]:
            verdicts = []
            for v, o in ours.items():
                x = o["tokens_per_s"] / res[k]["tokens_per_s"]
                verdicts.append(f"{v} {'met' if x >= want else 'NOT met'} ({x:.2f}x)")
            print(f"  target >= {want}x {names[k].split(' (')[0]}: " + ", ".join(verdicts))
    print("  GPU MFU (Qwen2-1.5B-shaped PRM, bf16): measured separately on a GPU with experiments/gpu_check.py")
    per = {**{f"jax-{v}": o["rates"] for v, o in ours.items()}, **{k: r["rates"] for k, r in res.items()
                                                                   if k != "jax" and "rates" in r}}
    print("  per-step real tokens/s: " + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in v) for k, v in per.items()))

if __name__ == "__main__":
    main()
