"""Tests run JAX on CPU with 8 fake devices; this must happen before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("PRM_JAX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (or $PRM_JAX_DATA); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PRM_JAX_DATA to its location)")
    return SHARED_DATA


TOY_TEXTS = [
    "Tom has 3 apples and buys 12 more. How many apples does he have?",
    "3 + 12 = 15", "15 * 4 = 60", "60 - 7 = 53", "The answer is \\boxed{53}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Step 1: 7 * 8 = 56. Step 2: 56 / 2 = 28. So the total is 28 dollars.",
] * 20


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE tokenizer with Qwen2's special tokens and chat template."""
    from prm_jax.toyworld.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("toy_tokenizer"))
    train_tokenizer(TOY_TEXTS, out, vocab_size=320)
    return out


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_tokenizer_dir)
