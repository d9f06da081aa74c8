"""Ids every caller of the sampler needs: the stop ids of a chat policy's tokenizer, and stable
per-record key ids that seed each record's random stream (so a resumed or resharded run draws what
the first would have)."""
from __future__ import annotations

import zlib


def stable_key_id(key: str) -> int:
    """A 31-bit id for a string key, the same in every process and run (unlike hash())."""
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


def default_stop_ids(tokenizer) -> list[int]:
    """eos plus the chat end-of-turn and end-of-text tokens when the tokenizer has them."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for name in ("<|im_end|>", "<|endoftext|>"):
        if name in vocab and vocab[name] not in ids:
            ids.append(int(vocab[name]))
    return ids
