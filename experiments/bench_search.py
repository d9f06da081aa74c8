"""Search benchmark: prm_jax's beam search (`prm_jax.search`, policy and PRM in one JAX process) vs
the same algorithm written here on transformers + torch (HF `generate` with the stop string
"\\n\\n", the PRM loaded from our export with AutoModel trust_remote_code=True).

Models: a small random Qwen2 policy and PRM (--hidden, --layers) over a byte-level toy tokenizer,
saved in Hugging Face layout and loaded by both engines from the same files. The policy's weights
are shaped so it writes short multi-step solutions: a large v-projection bias in its last layer
adds a constant direction to the final hidden state, and the LM head's columns along it act as a
logit bias (a few tokens allowed, "\\n" favoured, EOS rare), in plain Qwen2 weights.

Figures: problems/s of each engine at each N (beam width --beam-width), ours warm (a first call
compiles, its time is printed too, and an untimed run of the timed seed compiles the PRM's and the
sampler's programs for its shapes), and ours again (as warm) without the KV reuse
(reuse_kv=False: every kept beam's prompt and steps prefilled again at each step), with the
tokens the policy prefilled either way (the sampler's count) and whether both runs agree.
Agreement, exact: (1) the same candidate steps fed to both selection loops: every row our sampler
returned in the first (compile) run at each N is recorded by (prefix, random-stream key), and the
transformers loop replays them instead of calling `generate`; it must then request exactly the
beams ours expanded (the same prefixes, paths and copy counts), keep the same beams, and return the
same candidates (paths, texts, finish, scores to 1e-4, its PRM in torch) and the same weighted /
PRM-argmax / majority answers. (2) temperature 0 (HF greedy `generate` vs our sampler): the
same candidates and answers, a check of the policy side too.

  python experiments/bench_search.py [--problems 4] [--ns 4,16] [--beam-width 4] [--max-steps 4]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from prm_jax.data.prm_format import DEFAULT_SYSTEM_PROMPT, encode_prm
from prm_jax.grading import extract_answer, last_boxed
from prm_jax.data.steps import policy_prompt_ids, split_steps
from prm_jax.models.hf import load_causal_lm, load_prm, save_hf
from prm_jax.models.prm import Qwen2PRM
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prm_jax.grading import Grader
from prm_jax.sampling import sampler
from prm_jax.search import answers, policy as search_policy
from prm_jax.search.run import search
from prm_jax.toyworld.tokenizer import train_tokenizer

TEXTS = ["Tom has 3 apples and buys 12 more. How many apples does he have?", "3 + 12 = 15\n\n15 * 4 = 60",
         "The answer is \\boxed{53}.", "Please reason step by step, and put your final answer within \\boxed{}.",
         "Step 1: 7 * 8 = 56. Step 2: 56 / 2 = 28. So the total is 28 dollars."] * 20
ALLOWED = ["1", "2", "7", "+", "Ġ=", "Ġ", "\\", "boxed", "{", "}"]


def shape_policy(model: Qwen2ForCausalLM, tok) -> None:
    """A constant direction in the last hidden state (last layer's v bias) and a logit bias along it."""
    attn = model.model.layers[-1].self_attn
    b = attn.v_proj.bias
    b[...] = jnp.asarray(np.random.RandomState(0).randn(*b[...].shape) * 50.0, jnp.float32)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, len(tok), (4, 24)))
    h = np.asarray(model.model(ids, jnp.ones_like(ids)), np.float64).reshape(-1, model.cfg.hidden_size)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    d = h.mean(0)
    d /= np.linalg.norm(d)
    bias = np.full(len(tok), -30.0)
    bias[[tok.convert_tokens_to_ids(w) for w in ALLOWED]] = 0.0
    bias[tok.convert_tokens_to_ids("Ċ")] = 0.0
    bias[tok.eos_token_id] = -2.0
    k = model.lm_head.kernel
    scale = np.sqrt(model.cfg.hidden_size)
    k[...] = jnp.asarray(np.asarray(k[...]) * 0.5 + np.outer(d, bias) / scale, jnp.float32)


def build(root: str, hidden: int, layers: int):
    tok = train_tokenizer(TEXTS, os.path.join(root, "tok"), vocab_size=320)
    cfg = Qwen2Config.preset("tiny", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_layers=layers, num_heads=4, num_kv_heads=2)
    policy = Qwen2ForCausalLM(cfg, nnx.Rngs(0))
    shape_policy(policy, tok)
    prm = Qwen2PRM(cfg, nnx.Rngs(1))
    prm.score.dense_out.kernel[...] = prm.score.dense_out.kernel[...] * 400.0  # spread the scores
    save_hf(policy, os.path.join(root, "policy"), tokenizer_dir=os.path.join(root, "tok"))
    save_hf(prm, os.path.join(root, "prm"), tokenizer_dir=os.path.join(root, "tok"))
    return os.path.join(root, "policy"), os.path.join(root, "prm")


class Recorder:
    """Wraps the sampler call of prm_jax.search.policy and records, per (prefix ids, key id), the
    rows it returned: the candidate steps ours generated, for the transformers loop to replay."""

    def __init__(self):
        self.rows: dict[tuple, list[list[int]]] = {}
        self.real = search_policy.generate_from_prefixes

    def __enter__(self):
        def recording(model, prefixes, n, *a, key_ids, **kw):
            out = self.real(model, prefixes, n, *a, key_ids=key_ids, **kw)
            for prefix, key, rows in zip(prefixes, key_ids, out[0] if kw.get("return_cache") else out):
                self.rows[tuple(prefix), key] = rows
            return out
        search_policy.generate_from_prefixes = recording
        return self

    def __exit__(self, *exc):
        search_policy.generate_from_prefixes = self.real


class TorchBeamSearch:
    """search-and-learn's beam search on transformers: the rules of prm_jax.search.strategies
    (kept beams in path order, copies n // k + (b < n % k), ties broken by path)."""

    def __init__(self, policy_dir: str, prm_dir: str, max_tokens: int, temperature: float):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(policy_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
        self.prm = AutoModel.from_pretrained(prm_dir, trust_remote_code=True, dtype=torch.float32).eval()
        self.step_id = self.tok.convert_tokens_to_ids("<extra_0>")
        self.max_tokens, self.temperature = max_tokens, temperature
        self.policy_tokens = 0

    def expand(self, ids: list[int], copies: int, to_end: bool,
               given: list[list[int]] | None = None) -> list[tuple[list[int], str | None]]:
        """`copies` new segments after ids from HF generate, or the `given` rows (replay)."""
        if given is not None:
            assert len(given) == copies, (len(given), copies)
            new = given
        else:
            kw = dict(do_sample=True, temperature=self.temperature, top_p=1.0, top_k=0) if self.temperature else \
                dict(do_sample=False)
            if not to_end:
                kw.update(stop_strings="\n\n", tokenizer=self.tok)
            with torch.no_grad():
                out = self.lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=self.max_tokens,
                                       num_return_sequences=copies if self.temperature else 1,
                                       eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id, **kw)
            if not self.temperature:  # greedy: every copy is the same row (HF refuses num_return_sequences > 1)
                out = out.repeat(copies, 1)
            new = out[:, len(ids):].tolist()
        rows = []
        for row in new:
            seg = []
            for t in row:  # finished rows are padded after their stop
                seg.append(t)
                if t == self.tok.eos_token_id or (not to_end and "\n\n" in self.tok.decode(seg, skip_special_tokens=True)):
                    break
            self.policy_tokens += len(seg)
            if seg[-1] == self.tok.eos_token_id:
                fin = "eos"
            elif last_boxed(self.tok.decode(seg, skip_special_tokens=True)) is not None:
                fin = "answer"  # a step stating the final answer ends its candidate, as in prm_jax.search
            elif to_end or "\n\n" not in self.tok.decode(seg, skip_special_tokens=True):
                fin = "length"
            else:
                fin = None
            rows.append((seg, fin))
        return rows

    def scores(self, problem: str, texts: list[str]) -> list[list[float]]:
        encs = [encode_prm(self.tok, problem, split_steps(t), self.step_id, DEFAULT_SYSTEM_PROMPT) for t in texts]
        width = max(map(len, encs))
        ids = torch.tensor([e + [self.tok.pad_token_id] * (width - len(e)) for e in encs])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encs])
        with torch.no_grad():
            return self.prm.step_rewards(ids, attention_mask=mask, step_token_id=self.step_id)

    def run(self, pid, problem: str, n: int, m: int, max_steps: int, agg: str,
            replay: dict | None = None, asked: set | None = None) -> list[dict]:
        """The N best finished candidates; with `replay` (Recorder.rows) the steps are read from it
        (a beam ours never expanded raises KeyError) and each (prefix, key, copies) goes into `asked`."""
        prompt = policy_prompt_ids(self.tok, problem, DEFAULT_SYSTEM_PROMPT)
        kept, finished = [((), ())], []  # (tokens, path) of each kept beam
        key = lambda r: (r["score"] is None, -(r["score"] or 0.0), r["path"])  # noqa: E731
        for it in range(max_steps):
            rows = []
            for b, (toks, path) in enumerate(kept):
                copies = n // len(kept) + (b < n % len(kept))
                node = (tuple(prompt) + toks, search_policy.node_key(pid, path))
                if asked is not None:
                    asked.add((*node, copies))
                for j, (seg, fin) in enumerate(self.expand(prompt + list(toks), copies, it == max_steps - 1,
                                                           None if replay is None else replay[node])):
                    rows.append({"tokens": toks + tuple(seg), "finish": fin, "path": path + (j,)})
            texts = [self.tok.decode(list(r["tokens"]), skip_special_tokens=True) for r in rows]
            for r, t, s in zip(rows, texts, self.scores(problem, texts)):
                r["text"], r["score"] = t, answers.aggregate(s, agg)
            finished += [r for r in rows if r["finish"]]
            best = sorted((r for r in rows if not r["finish"]), key=key)[:n // m]
            kept = sorted(((r["tokens"], r["path"]) for r in best), key=lambda b: b[1])
            if len(finished) >= n or not kept:
                break
        return sorted(finished, key=key)[:n]


def same_result(ours: dict, theirs: list[dict], grade) -> bool:
    """Same candidates (paths, texts, finish, scores to 1e-4) and the same picked answers."""
    cands = ours["candidates"]
    if [(tuple(c["path"]), c["text"], c["finish"]) for c in cands] != [(r["path"], r["text"], r["finish"])
                                                                        for r in theirs]:
        return False
    if not all((a is None) == (b is None) and (a is None or abs(a - b) < 1e-4)
               for a, b in zip([c["score"] for c in cands], [r["score"] for r in theirs])):
        return False
    finals = [extract_answer(r["text"]) for r in theirs]
    picks = answers.pick_answers(finals, [r["score"] for r in theirs], grade(finals, [ours["answer"]] * len(finals)),
                                 grade)
    return finals == [c["final_answer"] for c in cands] and all(picks[k] == ours["answers"][k] for k in picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--ns", default="4,16")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()
    problems = [{"id": f"b{i}", "problem": f"Tom has {i + 3} apples and buys 12 more. How many?",
                 "answer": str(i + 15)} for i in range(args.problems)]
    root = tempfile.mkdtemp(prefix="bench_search_")
    pol_dir, prm_dir = build(root, args.hidden, args.layers)
    from prm_jax.models.hf import load_tokenizer

    tok = load_tokenizer(pol_dir)
    policy, prm = load_causal_lm(pol_dir), load_prm(prm_dir)
    ref = TorchBeamSearch(pol_dir, prm_dir, args.max_tokens, args.temperature)
    print(f"devices: {jax.devices()[0].platform} x{len(jax.devices())}, torch threads {torch.get_num_threads()}; "
          f"policy/PRM hidden {args.hidden} x {args.layers} layers, vocab {len(tok)}; {args.problems} problems, "
          f"beam width {args.beam_width}, max steps {args.max_steps}, {args.max_tokens} tokens per step")
    common = dict(tokenizer=tok, prm_tokenizer=tok, strategy="beam", beam_width=args.beam_width, agg="last",
                  max_steps=args.max_steps, max_tokens=args.max_tokens, grade_workers=0, batch_size=args.problems)

    grade = Grader(workers=0).grade_many
    ns = [int(x) for x in args.ns.split(",")]

    # (2) Agreement at temperature 0: HF greedy generate and our sampler, then both selection loops.
    n0 = max(ns)
    ours0 = search(policy, prm, problems, n=n0, temperature=0.0, **common)
    ref.temperature = 0.0
    agree = sum(same_result(rec, ref.run(p["id"], p["problem"], n0, args.beam_width, args.max_steps, "last"), grade)
                for p, rec in zip(problems, ours0))
    steps = np.mean([len(c["steps"]) for r in ours0 for c in r["candidates"]])
    print(f"agreement at temperature 0, n={n0}: {agree}/{len(problems)} problems return the same candidates and "
          f"answers (mean {steps:.1f} steps per candidate)")

    ref.temperature = args.temperature
    for n in ns:
        # (1) the first call (it compiles) records its steps; the transformers loop replays them
        t0 = time.perf_counter()
        with Recorder() as rec:
            ours1 = search(policy, prm, problems, n=n, temperature=args.temperature, seed=1, **common)
        first = time.perf_counter() - t0
        agree, same_beams, asked = 0, 0, set()
        for p, mine in zip(problems, ours1):
            want = {(prefix, key, len(rows)) for (prefix, key), rows in rec.rows.items()
                    if prefix[:len(policy_prompt_ids(tok, p["problem"], DEFAULT_SYSTEM_PROMPT))]
                    == tuple(policy_prompt_ids(tok, p["problem"], DEFAULT_SYSTEM_PROMPT))}
            got: set = set()
            try:
                agree += same_result(mine, ref.run(p["id"], p["problem"], n, args.beam_width, args.max_steps, "last",
                                                   replay=rec.rows, asked=got), grade)
            except KeyError:  # it asked for a beam ours never expanded
                pass
            same_beams += got == want
            asked |= got
        depth = np.mean([len(c["path"]) for r in ours1 for c in r["candidates"]])
        print(f"n={n:>3} agreement on the same candidate steps (temperature {args.temperature}): {same_beams}/"
              f"{len(problems)} problems expand the same beams ({len(asked)} expansions), {agree}/{len(problems)} "
              f"return the same candidates and answers (mean {depth:.1f} steps per candidate)")

        for reuse in (True, False):  # the timed runs' programs (the sampler's and the PRM's shapes) compile here
            search(policy, prm, problems, n=n, temperature=args.temperature, seed=2, reuse_kv=reuse, **common)
        c0 = sampler.compile_count()
        p0 = sampler.total_stats().prefill_tokens
        t0 = time.perf_counter()
        recs = search(policy, prm, problems, n=n, temperature=args.temperature, seed=2, **common)
        ours = time.perf_counter() - t0
        p1 = sampler.total_stats().prefill_tokens
        t0 = time.perf_counter()
        whole = search(policy, prm, problems, n=n, temperature=args.temperature, seed=2, reuse_kv=False, **common)
        no_reuse = time.perf_counter() - t0
        p2 = sampler.total_stats().prefill_tokens
        compiled = sampler.compile_count() - c0
        same = sum({**a, "budget": None} == {**b, "budget": None} for a, b in zip(recs, whole))
        t0 = time.perf_counter()
        for p in problems:
            ref.run(p["id"], p["problem"], n, args.beam_width, args.max_steps, "last")
        theirs = time.perf_counter() - t0
        tokens = sum(r["budget"]["policy_tokens"] for r in recs)
        print(f"n={n:>3}: prm_jax {len(problems) / ours:7.3f} problems/s (first call incl. compile {first:.1f}s, "
              f"{tokens} policy tokens), transformers {len(problems) / theirs:7.3f} problems/s; "
              f"ratio {theirs / ours:.1f}x")
        print(f"       KV reuse: {p1 - p0} prefilled tokens vs {p2 - p1} without it "
              f"({(p2 - p1) / max(p1 - p0, 1):.1f}x "
              f"fewer), {len(problems) / no_reuse:.3f} problems/s without it; same candidates {same}/{len(problems)}; "
              f"{compiled} sampler programs compiled in the timed runs")

if __name__ == "__main__":
    main()
