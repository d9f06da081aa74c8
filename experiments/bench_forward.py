"""Forward throughput of the jitted Flax Qwen2 vs transformers' torch forward (same weights, same run),
and peak host memory while streaming a checkpoint in, vs the checkpoint's size.

    python experiments/bench_forward.py [--batch 8 --seq 512 --repeats 3]

Prints, never asserts. Config: Qwen2Config.preset("small") (vocab 32000, hidden 512, 8 layers, 8 heads, 2 kv heads,
intermediate 1408), untied, float32: a ~221 MB checkpoint, which is also the one whose load is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_load(path: str, which: str) -> dict:
    """Run in a fresh subprocess: peak RSS during the load minus the RSS just before it. The loaded model
    stays alive until the peak is read, so its bytes are inside the figure, not subtracted away."""
    if which == "prm_jax":
        import jax
        from prm_jax.models.hf import load_causal_lm
        jax.devices()  # start the backend before the baseline
        load = lambda: load_causal_lm(path)  # noqa: E731
    else:
        import torch
        from transformers import Qwen2ForCausalLM
        torch.zeros(1)

        def load():  # transformers memory-maps the file: touch every weight so its pages are really resident
            m = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
            with torch.no_grad():
                for p in m.parameters():
                    p.sum()
            return m
    before = _status_kb("VmRSS")
    try:  # reset the kernel's high-water mark so the peak is this load's own
        Path("/proc/self/clear_refs").write_text("5")
        sampler = None
    except OSError:
        sampler = _Sampler()
    t0 = time.perf_counter()
    model = load()
    if which == "prm_jax":
        import jax
        jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    seconds = time.perf_counter() - t0
    peak = sampler.stop() if sampler else _status_kb("VmHWM")
    del model
    files = list(Path(path).glob("*.safetensors"))
    return {"which": which, "seconds": seconds, "rss_before_mb": before / 1024, "peak_delta_mb": (peak - before) / 1024,
            "checkpoint_mb": sum(f.stat().st_size for f in files) / 2**20}


class _Sampler:
    """Fallback when /proc/self/clear_refs is not writable: poll VmRSS every millisecond."""

    def __init__(self):
        self.peak, self.running = _status_kb("VmRSS"), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, _status_kb("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _status_kb("VmRSS"))


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (compile / allocator)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (quick experiments)")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--measure-load", nargs=2, metavar=("DIR", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFCausalLM

    from prm_jax.models.hf import load_causal_lm
    from prm_jax.models.qwen2 import Qwen2Config

    cfg = Qwen2Config.preset("small", **({"num_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")}
    ref = HFCausalLM(HFConfig(**hf_cfg)).eval()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cpus, "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        if not args.skip_load:
            for which in ("prm_jax", "transformers"):
                r = json.loads(subprocess.run([sys.executable, __file__, "--measure-load", tmp, which], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])
                print(f"load {which:12s}: checkpoint {r['checkpoint_mb']:.1f} MiB, "
                      f"peak RSS delta {r['peak_delta_mb']:.1f} MiB"
                      f" = {r['peak_delta_mb'] / r['checkpoint_mb']:.2f}x checkpoint, {r['seconds']:.2f} s")
        model = load_causal_lm(tmp)  # the same weights as `ref`

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))  # params are arguments, not constants
    jids = jax.numpy.asarray(ids)
    jax_times = timed(lambda: fwd(state, jids).block_until_ready(), args.repeats)
    ours = np.asarray(fwd(state, jids))

    tids = torch.from_numpy(ids)
    with torch.inference_mode():
        torch_times = timed(lambda: ref(tids).logits, args.repeats)
        theirs = ref(tids).logits.numpy()

    j, t = statistics.median(jax_times), statistics.median(torch_times)
    print(f"forward {args.batch}x{args.seq} f32, {cfg.num_layers} layers, median of {args.repeats}: "
          f"prm_jax {tokens / j:,.0f} tok/s ({j:.2f} s), transformers {tokens / t:,.0f} tok/s ({t:.2f} s), "
          f"ratio {t / j:.2f}x")
    print(f"  all times prm_jax {[round(x, 2) for x in jax_times]}, transformers {[round(x, 2) for x in torch_times]};"
          f" max |logit diff| {np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main()
