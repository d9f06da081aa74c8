"""Qwen2.5's added-token table and the one place the released PRM departs from it.

Stock Qwen2.5 / Qwen2.5-Math tokenizers carry 22 added tokens at ids 151643..151664, with `<|quad_end|>` at 151651.
The released Qwen2.5-Math-PRM renamed 151651 to `<extra_0>` and scores there (vLLM's `step_tag_id` default).
A PRM trained from a Qwen2.5 init must end with that same layout, so instead of appending `<extra_0>` as a new id
(151665, which neither the official vocabulary nor vLLM's default knows) the tokenizer gets 151651 renamed.

Both forms are handled: a live transformers tokenizer (its Rust backend rebuilt from edited JSON, since added
tokens cannot be renamed in place) and the files of a saved tokenizer directory (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, added_tokens.json).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

log = logging.getLogger(__name__)

STEP_TOKEN = "<extra_0>"
RENAMED_TOKEN = "<|quad_end|>"
OFFICIAL_STEP_TOKEN_ID = 151651
FIRST_ADDED_ID = 151643
QWEN25_ADDED_TOKENS = (  # ids 151643.. in order, as in every Qwen2.5 tokenizer.json
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
QWEN25_TABLE = {FIRST_ADDED_ID + i: t for i, t in enumerate(QWEN25_ADDED_TOKENS)}


def _table_kind(id_to_token: dict[int, str]) -> str | None:
    """'stock' (151651 = <|quad_end|>), 'prm' (151651 = <extra_0>) or None (not Qwen2.5's table)."""
    for i, t in QWEN25_TABLE.items():
        if i != OFFICIAL_STEP_TOKEN_ID and id_to_token.get(i) != t:
            return None
    return {RENAMED_TOKEN: "stock", STEP_TOKEN: "prm"}.get(id_to_token.get(OFFICIAL_STEP_TOKEN_ID))


def table_kind(tokenizer) -> str | None:
    """Whether a transformers tokenizer has Qwen2.5's added-token table: 'stock', 'prm' or None."""
    return _table_kind({i: t.content for i, t in tokenizer.added_tokens_decoder.items()})


def is_official_vocabulary(tokenizer) -> bool:
    """Qwen2.5's special-token table (either name at 151651): the released PRM's vocabulary."""
    return table_kind(tokenizer) is not None


def _rename_in_tokenizer_json(data: dict) -> None:
    for entry in data.get("added_tokens", []):
        if entry.get("id") == OFFICIAL_STEP_TOKEN_ID:
            entry["content"] = STEP_TOKEN


def adopt_official_step_token(tokenizer, step_token: str) -> int | None:
    """If `step_token` is `<extra_0>` and `tokenizer` is a stock Qwen2.5 tokenizer, rename its 151651 from
    `<|quad_end|>` to `<extra_0>` in place and return 151651; otherwise change nothing and return None."""
    if step_token != STEP_TOKEN or table_kind(tokenizer) != "stock":
        return None
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    _rename_in_tokenizer_json(data)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))  # added_tokens_decoder reads the backend
    extras = getattr(tokenizer, "_extra_special_tokens", None)
    if extras is not None:  # keep <extra_0> special (skipped when decoding), as <|quad_end|> was
        tokenizer._extra_special_tokens = [
            AddedToken(STEP_TOKEN, rstrip=False, lstrip=False, normalized=False, special=True)
            if str(t) == RENAMED_TOKEN else t for t in extras]
    got = tokenizer.convert_tokens_to_ids(STEP_TOKEN)
    if got != OFFICIAL_STEP_TOKEN_ID:
        raise RuntimeError(f"renaming {RENAMED_TOKEN} to {STEP_TOKEN} left it at id {got}, not "
                           f"{OFFICIAL_STEP_TOKEN_ID}")
    log.warning("Qwen2.5 tokenizer: renamed id %d from %s to %s (the released PRM's step token)",
             OFFICIAL_STEP_TOKEN_ID, RENAMED_TOKEN, STEP_TOKEN)
    return OFFICIAL_STEP_TOKEN_ID


def _rename_list(values):
    return [STEP_TOKEN if (v.get("content") if isinstance(v, dict) else v) == RENAMED_TOKEN else v for v in values]


def adopt_official_step_token_files(directory: str | Path) -> bool:
    """The same rename on a saved tokenizer directory's files, when its tokenizer.json is stock Qwen2.5's.
    Returns whether the files changed."""
    directory = Path(directory)
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        return False
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    if _table_kind({e["id"]: e["content"] for e in data.get("added_tokens", [])}) != "stock":
        return False
    _rename_in_tokenizer_json(data)
    tok_file.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg_file = directory / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        entry = cfg.get("added_tokens_decoder", {}).get(str(OFFICIAL_STEP_TOKEN_ID))
        if entry is not None:
            entry["content"] = STEP_TOKEN
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(cfg.get(key), list):
                cfg[key] = _rename_list(cfg[key])
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    map_file = directory / "special_tokens_map.json"
    if map_file.is_file():
        smap = json.loads(map_file.read_text(encoding="utf-8"))
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(smap.get(key), list):
                smap[key] = _rename_list(smap[key])
        map_file.write_text(json.dumps(smap, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        added = json.loads(added_file.read_text(encoding="utf-8"))
        if added.get(RENAMED_TOKEN) == OFFICIAL_STEP_TOKEN_ID:
            del added[RENAMED_TOKEN]
            added[STEP_TOKEN] = OFFICIAL_STEP_TOKEN_ID
        added_file.write_text(json.dumps(added, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return True
