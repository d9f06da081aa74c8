"""Training metrics: FLOP counts, MFU, and the rows of OUT/metrics.jsonl (see `log_row`)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax

from prm_jax.models.qwen2 import Qwen2Config
from prm_jax.records import read_jsonl, repair_tail, write_jsonl

# -- FLOPs and MFU ------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per device (jax.devices()[0].device_kind, lower-cased substring).
PEAK_FLOPS = {
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v4": 275e12,
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12,
}


def peak_flops_per_device(device_kind: str, configured: float | None = None) -> float | None:
    if configured:
        return float(configured)
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return None  # CPU and unknown devices: MFU is not reported


def matmul_params(cfg: Qwen2Config, arch: str) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup is not one)."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    attn = h * cfg.num_heads * hd * 2 + h * cfg.num_kv_heads * hd * 2  # q, o ; k, v
    per_layer = attn + 3 * h * f
    head = h * h + h * 2 if arch == "prm" else h * cfg.vocab_size
    return cfg.num_layers * per_layer + head


def train_flops_per_token(cfg: Qwen2Config, arch: str, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / MaxText convention:
        6 * N  +  12 * L * H * D * T
    N = matmul parameters (`matmul_params`), L layers, H query heads of size D, T the row length
    (attention scores and the weighted sum, 2 matmuls x 2 FLOPs x 3 for fwd+bwd, without the
    causal half). Recomputation under remat is not counted (this is MFU, not HFU); nor is the PRM
    step's saving of running its last layer's queries and MLP at step tokens alone (~1/L of the
    work), so a PRM run's figure is that much above the work actually done."""
    return 6.0 * matmul_params(cfg, arch) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len


# -- metrics.jsonl ------------------------------------------------------------------------------

@dataclasses.dataclass
class Window:
    """Accumulates device metrics between log rows (fetched once per row, not per step)."""
    steps: list = dataclasses.field(default_factory=list)
    real: int = 0
    padded: int = 0
    flops: float = 0.0
    t0: float = dataclasses.field(default_factory=time.perf_counter)


def log_row(step: int, window: Window, n_devices: int, peak: float | None) -> dict[str, Any]:
    """metrics.jsonl row: loss / accuracy averaged over the window's labelled positions; grad norm
    and learning rate of the last step; tokens/s over the window's wall time (real tokens and
    padded slots); MFU = model FLOPs of the real tokens / (wall time * devices * peak)."""
    fetched = jax.device_get(window.steps)
    n = sum(int(m["labels"]) for m in fetched)
    loss = sum(float(m["loss"]) * int(m["labels"]) for m in fetched) / max(n, 1)
    acc = sum(float(m["accuracy"]) * int(m["labels"]) for m in fetched) / max(n, 1)
    dt = max(time.perf_counter() - window.t0, 1e-9)
    last = fetched[-1]
    return {
        "step": step, "loss": loss, "step_accuracy": acc, "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]), "labels": n,
        # None when the window held only the (compiling) first step of the process
        "tokens_per_s": window.real / dt if window.padded else None,
        "padded_tokens_per_s": window.padded / dt if window.padded else None,
        "mfu": (window.flops / dt / (n_devices * peak)) if peak and window.padded else None,
        "time": time.time(),
    }


def rewrite_metrics(path: str, upto: int) -> None:
    """On resume, drop rows logged after the checkpoint being resumed from."""
    if not os.path.exists(path):
        return
    repair_tail(path)
    write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= upto])


def append_row(path: str, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
