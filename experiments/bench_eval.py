"""ProcessBench samples scored per second: prm_jax's evaluation scorer vs transformers (torch) on the
same weights, same inputs, same run.

PRM: Qwen2Config.small() (vocab 32000, hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate
1408), random weights, float32, saved once in Hugging Face layout; the peer loads those files into
transformers' Qwen2Model plus the torch score head (Linear -> ReLU -> Linear). Tokenizer: a
byte-level BPE (vocab 32000) trained here on ProcessBench text. Inputs: `--samples` ProcessBench
samples taken evenly across the four subsets, encoded with the model card's chat format, cut at
`--max-length`.

Both sides do the same work per pass: encode all samples (chat prefix + steps + step tokens, cut at
`--max-length` and after the last surviving step token), batches of `--batch-size`, longest first.
Ours: `PRMScorer` (length buckets, one jitted forward per bucket; warm: a first pass compiles
and is reported separately). Peer: each batch right-padded to its own longest row (no buckets
needed in eager torch), one forward under torch.inference_mode, step scores read out at the step
tokens. Scores are compared, then each side is timed `--repeats` times; medians are printed.

The default size keeps one run within about five minutes on a 2-core CPU; on a bigger machine
pass e.g. --samples 256.

    python experiments/bench_eval.py [--samples 24] [--max-length 1024] [--batch-size 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("PRM_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")


def load_samples(n: int) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """n samples spread evenly over the subsets (every k-th record), and all text for the tokenizer."""
    per = [json.load(open(os.path.join(DATA, "processbench", f"{s}.json"))) for s in SUBSETS]
    texts = [t for recs in per for r in recs for t in [r["problem"], *r["steps"]]]
    picked = []
    for i, recs in enumerate(per):
        want = n // len(SUBSETS) + (i < n % len(SUBSETS))
        step = max(1, len(recs) // max(want, 1))
        picked += [(r["problem"], r["steps"]) for r in recs[::step][:want]]
    return picked, texts


def torch_peer(prm_dir: str):
    import torch
    from prm_jax.data.prm_format import encode_prm
    from safetensors.torch import load_file
    from transformers import Qwen2Config as HFConfig, Qwen2Model

    cfg = HFConfig.from_pretrained(prm_dir)
    model = Qwen2Model.from_pretrained(prm_dir, config=cfg, dtype=torch.float32).eval()
    weights = {k: v for f in glob.glob(os.path.join(prm_dir, "*.safetensors")) for k, v in load_file(f).items()}
    head = torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, cfg.hidden_size), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden_size, 2)).eval()
    head.load_state_dict({k[len("score."):]: v for k, v in weights.items() if k.startswith("score.")})

    def score(items, tokenizer, step_id: int, max_length: int, batch_size: int, pad_id: int) -> list[list[float]]:
        """Encode (as the model card; the same ids prm_jax builds) and score, batch by batch."""
        encoded = [encode_prm(tokenizer, p, list(s), step_id)[:max_length] for p, s in items]
        # the part after the last step token changes no score: drop it, as prm_jax does
        encoded = [ids[: len(ids) - ids[::-1].index(step_id)] for ids in encoded]
        out: list = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                length = len(encoded[rows[0]])
                ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), length), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, :len(encoded[i])] = 1
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                probs = torch.softmax(head(hidden).float(), -1)[..., 1]
                for r, i in enumerate(rows):
                    out[i] = probs[r, : len(encoded[i])][ids[r, :len(encoded[i])] == step_id].tolist()
        return out

    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers
    from flax import nnx

    from prm_jax.evaluation.scoring import PRMScorer
    from prm_jax.models.hf import save_hf
    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config
    from prm_jax.toyworld.tokenizer import train_tokenizer

    transformers.logging.set_verbosity_error()  # the score.* keys are loaded into the torch head separately
    items, texts = load_samples(args.samples)
    work = tempfile.mkdtemp(prefix="bench_eval_")
    tok = train_tokenizer(texts, os.path.join(work, "tok"), vocab_size=32000)
    cfg = Qwen2Config.small()
    prm = Qwen2PRM(cfg, nnx.Rngs(0))
    save_hf(prm, os.path.join(work, "prm"), tokenizer_dir=os.path.join(work, "tok"))
    peer = torch_peer(os.path.join(work, "prm"))

    scorer = PRMScorer(prm, tok, batch_size=args.batch_size, max_length=args.max_length)
    encoded = [scorer.encode(p, s) for p, s in items]
    # Keep samples with at least one scored step; cut each after its last step token that survives
    # truncation (tokens after it change no score), so both sides run exactly the same ids.
    inputs = [list(e.ids[: e.step_positions[-1] + 1]) for e in encoded if e.step_positions]
    n_tokens = sum(map(len, inputs))
    scored_items = [it for it, e in zip(items, encoded) if e.step_positions]
    peer_args = (tok, scorer.step_token_id, args.max_length, args.batch_size, scorer.pad_id)
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}; "
          f"{len(scored_items)} ProcessBench samples, {n_tokens} tokens (mean {n_tokens / len(inputs):.0f}, "
          f"max {max(map(len, inputs))}), max_length {args.max_length}, batch {args.batch_size}, "
          f"buckets {scorer.buckets}")

    t = time.perf_counter()
    ours = scorer.score(scored_items)
    print(f"prm_jax first pass (compiles {len(scorer.shapes_used)} bucket shapes): {time.perf_counter() - t:.1f} s")
    theirs = peer(scored_items, *peer_args)
    diff = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    assert all(len(x) == len(y) for x, y in zip(ours, theirs)), "step counts differ"
    print(f"max |score difference| prm_jax vs transformers: {diff:.2e}")

    # Alternate the two sides so a change in machine load hits both alike.
    jts, tts = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        scorer.score(scored_items)
        jts.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer(scored_items, *peer_args)
        tts.append(time.perf_counter() - t)
    jt, tt = statistics.median(jts), statistics.median(tts)
    n = len(scored_items)
    print(f"prm_jax eval:      {n / jt:8.2f} samples/s  ({n_tokens / jt:8.0f} tok/s)  median of "
          f"{[round(x, 2) for x in jts]} s")
    print(f"transformers+torch:{n / tt:8.2f} samples/s  ({n_tokens / tt:8.0f} tok/s)  median of "
          f"{[round(x, 2) for x in tts]} s")
    print(f"ratio prm_jax / transformers: {tt / jt:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
