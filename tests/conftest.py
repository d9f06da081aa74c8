"""Tests run JAX on CPU with 8 fake devices; this must happen before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("PRM_JAX_DATA", REPO.parent / "shared" / "data"))
TINY_RECIPE = str(REPO / "experiments" / "recipes" / "tiny-cpu.yaml")


def toy_records(n: int, seed: int) -> list[dict]:
    """PRM training records whose step labels a tiny model can learn (a step is good iff it names apples)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        steps = [rng.choice(["Tom has 3 apples", "15 * 4 = 60", "60 - 7 = 53"]) for _ in range(rng.randint(1, 3))]
        out.append({"id": i, "problem": "How many apples?", "steps": steps,
                    "labels": [int("apples" in s) for s in steps]})
    return out


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


QWEN25_EXTRA_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                        "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory) -> str:
    """A stock-Qwen2.5-shaped tokenizer: a small byte-level BPE trained here, its vocabulary padded with unreachable
    filler tokens to 151643 entries, then Qwen2.5's 22 added tokens in Qwen2.5's order, so `<|endoftext|>` is
    151643, `<|im_start|>` 151644, `<|im_end|>` 151645, ..., `<|quad_end|>` 151651, ..., `<|file_sep|>` 151664 (and
    no `<extra_0>`), with Qwen's ChatML template. Built once per session (a few seconds)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prm_jax.models.qwen_vocab import FIRST_ADDED_ID, QWEN25_ADDED_TOKENS
    from prm_jax.toyworld.tokenizer import CHAT_TEMPLATE

    def fresh(model):
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        return tok

    small = fresh(models.BPE())
    small.train_from_iterator(TOY_TEXTS, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model_json = json.loads(small.to_str())["model"]
    vocab = dict(model_json["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    for i in range(len(vocab), FIRST_ADDED_ID):  # unreachable: no merge produces them
        vocab[f"<|filler_{i}|>"] = i
    tok = fresh(models.BPE(vocab=vocab, merges=merges))
    for name in QWEN25_ADDED_TOKENS:  # Qwen2.5 marks the first 14 special, the tool/FIM/repo ones not
        tok.add_tokens([AddedToken(name, normalized=False, special=QWEN25_ADDED_TOKENS.index(name) < 14)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN25_EXTRA_SPECIAL, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out = str(tmp_path_factory.mktemp("qwen25_tokenizer"))
    fast.save_pretrained(out)
    return out


def spread_tiny_prm(vocab_size: int, seed: int):
    """A tiny random PRM whose scores spread away from 0.5 (a random head leaves them all there)."""
    from flax import nnx

    from prm_jax.models.prm import Qwen2PRM
    from prm_jax.models.qwen2 import Qwen2Config

    prm = Qwen2PRM(Qwen2Config.preset("tiny", vocab_size=vocab_size), nnx.Rngs(seed))
    k = prm.score.dense_out.kernel
    k.set_value(k.get_value() * 400.0)
    return prm


@pytest.fixture(scope="module")
def mesh():
    """A mesh over all (8 fake) devices on the data axis."""
    from prm_jax.parallel.mesh import make_mesh

    return make_mesh()
