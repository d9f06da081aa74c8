"""Step rewards of a prm_jax PRM export, read back by vLLM: the same token ids scored by prm_jax and by vLLM's
`Qwen2ForProcessRewardModel` (`LLM(model=dir, runner="pooling").encode(..., pooling_task="token_classify")`),
the largest |difference| printed.

    python experiments/vllm_check.py [--vllm-python /work/peers/vllm/bin/python] [--cases toy,qwen] [--n 8]
                                     [--no-serve]

Run with the project's Python. vLLM is never a dependency of prm_jax: the vLLM half runs as a child process in
its own venv (shared/tools/peer-venvs.sh), which reads the export from disk and the token ids from a JSON file.
Then (unless --no-serve) the export is served as a user would serve it, `vllm serve DIR --runner pooling`
(plus `--pooler-config '{"step_tag_id": ...}'` where needed; the line is printed), on 127.0.0.1, and the same
ids go to `POST /pooling` with task token_classify: each step token answers [p_wrong, p_right].

Two cases, one export each (random weights, float32 on both sides):
- `toy`: a byte-level BPE tokenizer trained here (prm_jax.toyworld.tokenizer, 512 tokens) whose step token
  `<extra_0>` has id 3. vLLM defaults `step_tag_id` to 151651, so this export needs
  `PoolerConfig(step_tag_id=3)`; the equivalent `vllm serve --pooler-config` line is printed.
- `qwen`: a tokenizer in the released PRM's id layout (the trained BPE, its vocabulary padded with unused
  tokens to 151,643 entries, then Qwen2.5's special tokens, so `<extra_0>` is 151651) and vocab_size 151,936:
  vLLM's default reads it with no flag at all.
The model is hidden 128 with 2 heads and 1 kv head (head_dim 64: vLLM's CPU attention has kernels for 32, 64,
80, ... only), 2 layers. Its weights are redrawn larger than the init's (kernels N(0, 1.5^2/fan_in), biases and
norm scales perturbed): with the init's 0.02 every reward sits at 0.5 and any two implementations agree trivially.

The step token id is read from the export's config.json (`step_token_id`, written by prm_jax's export), else
from the export's tokenizer (`<extra_0>`). The inputs are the first N ProcessBench GSM8K solutions, the i-th cut
to a different number of steps (ragged lengths), encoded as prm_jax encodes them for training and evaluation
(prm_jax.data.prm_format.encode_prm); both sides get exactly those ids.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
from flax import nnx
from bench_eval import spread_weights
from vllm_peer import served, vllm_env

from prm_jax.data.prm_format import DEFAULT_STEP_TOKEN
from prm_jax.models.qwen_vocab import OFFICIAL_STEP_TOKEN_ID
from prm_jax.evaluation.scoring import PRMScorer
from prm_jax.models.hf import load_tokenizer, read_config, save_hf
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config
from prm_jax.toyworld.tokenizer import CHAT_TEMPLATE, train_tokenizer

PROCESSBENCH = "/work/shared/data/processbench/gsm8k.json"
QWEN_VOCAB = 151_936  # Qwen2.5's embedding rows
QWEN_FIRST_SPECIAL = 151_643  # <|endoftext|> in Qwen2.5's tokenizers
# Qwen2.5's added tokens from 151643 on, with 151651 (<|quad_end|> there) named as the released PRM names it.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", DEFAULT_STEP_TOKEN]
MAX_LENGTH = 2048

# The vLLM half, run by the vLLM venv's python: args job.json out.json.
CHILD = r'''
import json, sys, time


def main():
    import vllm
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as f:
        job = json.load(f)
    kw = {} if job["step_tag_id"] is None else {"pooler_config": PoolerConfig(step_tag_id=job["step_tag_id"])}
    t0 = time.time()
    llm = LLM(model=job["model"], runner="pooling", dtype="float32", max_model_len=job["max_model_len"],
              enforce_eager=True, seed=0, **kw)
    t1 = time.time()
    outs = llm.encode([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]],
                      pooling_task="token_classify", use_tqdm=False)
    # Each output: [number of step tokens, num_labels] softmax probabilities; P(correct) is column 1.
    rewards = [o.outputs.data[:, 1].tolist() for o in outs]
    with open(sys.argv[2], "w") as f:
        json.dump({"rewards": rewards, "vllm": vllm.__version__, "load_s": t1 - t0, "encode_s": time.time() - t1,
                   "step_tag_id": llm.llm_engine.model_config.pooler_config.step_tag_id}, f)


if __name__ == "__main__":
    main()
'''


def processbench_items(n: int) -> list[tuple[str, list[str]]]:
    """The first n GSM8K items, the i-th cut to 1 + i mod len(steps) steps, so lengths and step counts vary."""
    with open(PROCESSBENCH, encoding="utf-8") as f:
        data = json.load(f)
    items = []
    for i, rec in enumerate(data[:n]):
        steps = rec["steps"]
        items.append((rec["problem"], steps[: 1 + i % len(steps)] if i % 3 else steps))
    return items


def corpus(n: int = 400) -> list[str]:
    with open(PROCESSBENCH, encoding="utf-8") as f:
        data = json.load(f)
    return [r["problem"] + "\n" + "\n".join(r["steps"]) for r in data[:n]]


def qwen_layout_tokenizer(texts: list[str], out_dir: str):
    """A BPE tokenizer with Qwen2.5's id layout: the trained vocabulary padded with unused tokens to 151,643
    entries, then Qwen2.5's special tokens, so `<extra_0>` is 151651 as in the released PRM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), QWEN_FIRST_SPECIAL):  # never produced: no merge builds them
        vocab[f"<|unused_{i}|>"] = i
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    fast.chat_template = CHAT_TEMPLATE
    got = fast.convert_tokens_to_ids(DEFAULT_STEP_TOKEN)
    if got != OFFICIAL_STEP_TOKEN_ID:
        raise RuntimeError(f"qwen-layout tokenizer put {DEFAULT_STEP_TOKEN} at {got}, not {OFFICIAL_STEP_TOKEN_ID}")
    fast.save_pretrained(out_dir)
    return fast


def random_prm(vocab_size: int, seed: int) -> Qwen2PRM:
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=MAX_LENGTH)
    return spread_weights(Qwen2PRM(cfg, nnx.Rngs(seed)), seed, kernel_scale=1.5)


def step_token_of(export: str) -> tuple[int, str]:
    """The export's step token id and where it was read: config.json's `step_token_id`, else the tokenizer."""
    cfg = read_config(export)
    if "step_token_id" in cfg:
        return int(cfg["step_token_id"]), "config.json step_token_id"
    return int(load_tokenizer(export).convert_tokens_to_ids(DEFAULT_STEP_TOKEN)), f"tokenizer {DEFAULT_STEP_TOKEN}"


def run_case(case: str, args, work: str) -> None:
    tok_dir, export = os.path.join(work, f"{case}_tokenizer"), os.path.join(work, f"{case}_prm")
    texts = corpus()
    if case == "toy":
        tokenizer = train_tokenizer(texts, tok_dir, vocab_size=512)
        vocab_size = len(tokenizer)
    else:
        tokenizer = qwen_layout_tokenizer(texts, tok_dir)
        vocab_size = QWEN_VOCAB
    prm = random_prm(vocab_size, args.seed)
    save_hf(prm, export, tokenizer_dir=tok_dir)
    step_id, source = step_token_of(export)
    tokenizer = load_tokenizer(export)

    items = processbench_items(args.n)
    scorer = PRMScorer(prm, tokenizer, step_token=step_id, batch_size=4, max_length=MAX_LENGTH,
                       buckets=(256, 512, 1024, MAX_LENGTH))
    ours = scorer.score(items)
    prompts = [list(scorer.encode(p, s).ids) for p, s in items]
    if any(len(o) != len(s) for o, (_, s) in zip(ours, items)):
        raise RuntimeError(f"{case}: some inputs were truncated at {MAX_LENGTH} tokens; raise MAX_LENGTH")

    flag = None if step_id == OFFICIAL_STEP_TOKEN_ID else step_id
    job, result = os.path.join(work, f"{case}_job.json"), os.path.join(work, f"{case}_vllm.json")
    with open(job, "w") as f:
        json.dump({"model": export, "prompts": prompts, "step_tag_id": flag, "max_model_len": MAX_LENGTH}, f)
    child = os.path.join(work, "vllm_child.py")
    with open(child, "w") as f:
        f.write(CHILD)
    t0 = time.time()
    proc = subprocess.run([args.vllm_python, child, job, result], check=False, capture_output=True, text=True, env=vllm_env(args.kvcache_gib),
                          timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"{case}: the vLLM child exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    with open(result) as f:
        got = json.load(f)
    theirs = got["rewards"]
    if [len(t) for t in theirs] != [len(o) for o in ours]:
        raise RuntimeError(f"{case}: vLLM returned {[len(t) for t in theirs]} step rewards per solution, "
                           f"prm_jax {[len(o) for o in ours]}")
    a = np.concatenate([np.asarray(o, np.float64) for o in ours])
    diff = max_diff(a, theirs)
    lengths = [len(p) for p in prompts]
    print(f"{case}: export {export} (vocab {vocab_size}), step token {step_id} from {source}; vLLM {got['vllm']} "
          f"step_tag_id={got['step_tag_id']} (load {got['load_s']:.0f} s, encode {got['encode_s']:.1f} s, "
          f"child {time.time() - t0:.0f} s); prompt lengths {min(lengths)}-{max(lengths)} tokens, rewards "
          f"{a.min():.3f}-{a.max():.3f}", flush=True)
    user_flags = ["--runner", "pooling"] + ([] if flag is None else
                                            ["--pooler-config", json.dumps({"step_tag_id": flag})])
    shown = " ".join(f"'{x}'" if x.startswith("{") else x for x in user_flags)
    print(f"  {case}: a user serves it with: vllm serve {export} {shown}"
          + (f"  (step token {OFFICIAL_STEP_TOKEN_ID} is vLLM's default: no flag)" if flag is None else ""),
          flush=True)
    served_diff = ""
    if not args.no_serve:
        serve_args = [*user_flags, "--dtype", "float32", "--max-model-len", str(MAX_LENGTH), "--enforce-eager",
                      "--seed", "0"]
        with served(args.vllm_python, export, serve_args, work, kvcache_gib=args.kvcache_gib,
                    ready_timeout=args.timeout) as url:
            body = post_json(url + "/pooling", {"input": prompts, "task": "token_classify"}, args.timeout)
        rows = [d["data"] for d in sorted(body["data"], key=lambda d: d["index"])]
        if [len(r) for r in rows] != [len(o) for o in ours]:
            raise RuntimeError(f"{case}: /pooling returned {[len(r) for r in rows]} step rows per solution, "
                               f"prm_jax {[len(o) for o in ours]}")
        pairs = np.concatenate([np.asarray(r, np.float64).reshape(-1, 2) for r in rows])
        if abs(pairs.sum(axis=1) - 1).max() > 1e-5:
            raise RuntimeError(f"{case}: /pooling rows are not [p_wrong, p_right] probabilities: {rows[0][:2]}")
        served_diff = f", {max_diff(a, [[p[1] for p in r] for r in rows]):.1e} through vllm serve /pooling"
    print(f"vllm_check: {len(items)} solutions, {a.size} step rewards, max |diff| = {diff:.1e} (float32) "
          f"offline{served_diff}, step_tag_id={step_id}" + ("" if flag is None else " (pooler-config flag)"),
          flush=True)


def max_diff(ours: np.ndarray, theirs: list[list[float]]) -> float:
    b = np.concatenate([np.asarray(t, np.float64) for t in theirs])
    if b.shape != ours.shape:
        raise RuntimeError(f"vLLM returned {b.size} step rewards, prm_jax {ours.size}")
    return float(np.max(np.abs(ours - b)))


def post_json(url: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    ap.add_argument("--cases", default="toy,qwen", help="comma list of toy, qwen")
    ap.add_argument("--n", type=int, default=8, help="ProcessBench GSM8K solutions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    ap.add_argument("--kvcache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE for the child")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for each vLLM child / server start")
    ap.add_argument("--no-serve", action="store_true", help="skip the `vllm serve` + /pooling half")
    args = ap.parse_args()
    if not os.path.isfile(args.vllm_python):
        sys.exit(f"--vllm-python {args.vllm_python}: not found; build the venv with shared/tools/peer-venvs.sh DIR vllm")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("toy", "qwen")]
    if bad:
        sys.exit(f"--cases: unknown {bad}; expected toy and/or qwen")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or tmp
        os.makedirs(work, exist_ok=True)
        for case in cases:
            run_case(case, args, work)


if __name__ == "__main__":
    main()
