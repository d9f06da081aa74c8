"""The grain pipeline: PRM/LM encoding, labels, truncation, bad records, shuffle, packing, placement."""
import json
import re

import jax
import numpy as np
import pytest

from prm_jax.data import pipeline as pl
from prm_jax.data.prm_format import encode_prm, prompt_ids, resolve_step_token
from prm_jax.parallel.mesh import make_mesh
from prm_jax.records import RecordError

PROBLEM = "Tom has 3 apples and buys 12 more. How many apples does he have?"
STEPS = ["3 + 12 = 15", "15 * 4 = 60", "The answer is \\boxed{53}."]


def write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def opts_for(tok, objective="prm", max_length=256, system_prompt=None):
    return pl.EncodeOptions(objective=objective, max_length=max_length, step_token_id=resolve_step_token(tok),
                            step_token_text="<extra_0>", system_prompt=system_prompt,
                            eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("objective,labels", [("prm", [1, 1, 0]), ("prm-soft", [0.875, 0.5, 0.0])])
def test_prm_encoding_matches_encode_prm_and_labels_sit_on_step_tokens(tmp_path, toy_tokenizer, objective, labels):
    sid = resolve_step_token(toy_tokenizer)
    path = write(tmp_path / "r.jsonl", [{"id": "a", "problem": PROBLEM, "steps": STEPS, "labels": labels}])
    opts = opts_for(toy_tokenizer, objective, system_prompt=pl.DEFAULT_SYSTEM_PROMPT)
    ex = pl.encode_records(toy_tokenizer, path, opts).examples[0]
    ref = encode_prm(toy_tokenizer, PROBLEM, STEPS, sid)  # the shared reference encoder
    assert ex["input_ids"].tolist() == ref
    where = [i for i, t in enumerate(ref) if t == sid]
    assert len(where) == 3 and where[-1] == len(ref) - 1
    expected = np.full(len(ref), -100.0)
    expected[where] = labels
    np.testing.assert_array_equal(ex["labels"], expected)
    assert ex["labels"].dtype == (np.float32 if objective == "prm-soft" else np.int32)


def test_truncation_drops_cut_steps_and_counts_them(tmp_path, toy_tokenizer):
    sid = resolve_step_token(toy_tokenizer)
    ref = encode_prm(toy_tokenizer, PROBLEM, STEPS, sid, system_prompt=None)
    pos = [i for i, t in enumerate(ref) if t == sid]
    cut = pos[1]  # keeps tokens [0, cut): the first step token only
    recs = [{"id": 1, "problem": PROBLEM, "steps": STEPS, "labels": [1, 0, 0]},
            {"id": 2, "problem": "x" * 400, "steps": ["1 + 1 = 2"], "labels": [1]}]  # prompt alone too long
    enc = pl.encode_records(toy_tokenizer, write(tmp_path / "r.jsonl", recs), opts_for(toy_tokenizer, max_length=cut))
    assert len(enc.examples) == 1
    ex = enc.examples[0]
    assert ex["input_ids"].tolist() == ref[:cut]
    assert np.flatnonzero(ex["labels"] != -100).tolist() == [pos[0]] and ex["labels"][pos[0]] == 1
    s = enc.stats
    assert (s.records, s.kept, s.truncated_records, s.dropped_step_labels, s.dropped_records) == (2, 1, 2, 3, 1)


def test_lm_labels_are_next_tokens_of_the_response_only(tmp_path, toy_tokenizer):
    recs = [{"id": 0, "problem": PROBLEM, "steps": STEPS}, {"id": 1, "prompt": PROBLEM, "text": "15 * 4 = 60"}]
    enc = pl.encode_records(toy_tokenizer, write(tmp_path / "lm.jsonl", recs), opts_for(toy_tokenizer, "lm"))
    for rec, ex in zip(recs, enc.examples):
        prefix = prompt_ids(toy_tokenizer, PROBLEM, None)
        body = toy_tokenizer.encode(rec.get("text") or "\n\n".join(STEPS), add_special_tokens=False)
        ids = prefix + body + [toy_tokenizer.eos_token_id]
        assert ex["input_ids"].tolist() == ids
        want = [-100] * len(ids)
        for t in range(len(prefix) - 1, len(ids) - 1):  # predict every response token and the end of turn
            want[t] = ids[t + 1]
        assert ex["labels"].tolist() == want


BAD = [
    ({"id": 1, "problem": "p", "steps": [], "labels": []}, "at least one step"),
    ({"id": 1, "problem": "p", "steps": ["a", "b"], "labels": [1]}, "1 labels for 2 steps"),
    ({"id": 1, "problem": "p", "steps": ["a <extra_0> b"], "labels": [1]}, "contains the step token"),
    ({"id": 1, "problem": "p", "steps": "a", "labels": [1]}, "'steps' should be list"),
    ({"id": 1, "problem": 3, "steps": ["a"], "labels": [1]}, "'problem' should be str"),
    ({"id": 1, "problem": "p", "steps": ["a"], "labels": [0.5]}, "needs 0 or 1"),
    ({"id": 1, "problem": "p", "steps": [7], "labels": [1]}, "steps[0] should be str"),
    ({"problem": "p", "steps": ["a"], "labels": [1]}, "missing key 'id'"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_record_names_file_and_line(tmp_path, toy_tokenizer, bad, message):
    good = {"id": 0, "problem": "p", "steps": ["a"], "labels": [1]}
    path = write(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(RecordError, match=rf"bad\.jsonl:2: .*{re.escape(message)}"):
        pl.encode_records(toy_tokenizer, path, opts_for(toy_tokenizer))


def test_repeated_id_names_both_lines(tmp_path, toy_tokenizer):
    rec = {"id": "x", "problem": "p", "steps": ["a"], "labels": [1]}
    path = write(tmp_path / "dup.jsonl", [rec, {**rec, "id": "y"}, rec])
    with pytest.raises(RecordError, match=r"dup\.jsonl:3: id 'x' repeats the record at line 1"):
        pl.encode_records(toy_tokenizer, path, opts_for(toy_tokenizer))


def test_soft_label_range_and_lm_format_errors(tmp_path, toy_tokenizer):
    path = write(tmp_path / "s.jsonl", [{"id": 0, "problem": "p", "steps": ["a"], "labels": [1.5]}])
    with pytest.raises(RecordError, match=r"s\.jsonl:1: .*number in \[0, 1\]"):
        pl.encode_records(toy_tokenizer, path, opts_for(toy_tokenizer, "prm-soft"))
    path = write(tmp_path / "l.jsonl", [{"id": 0, "problem": "p", "steps": ["a"], "text": "a"}])
    with pytest.raises(RecordError, match=r"l\.jsonl:1: .*exactly one of 'steps'"):
        pl.encode_records(toy_tokenizer, path, opts_for(toy_tokenizer, "lm"))


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(5, 30))
        ids = np.arange(1000 * i, 1000 * i + L, dtype=np.int32)  # every token names its example
        labels = np.full(L, -100, np.int32)
        labels[L - 1] = i % 2
        out.append({"input_ids": ids, "labels": labels})
    return out


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("pack,group", [(False, 0), (True, 0), (False, 2)])
def test_shuffle_is_seeded_and_iterator_state_resumes_exactly(pack, group):
    exs = _examples(23)
    kw = dict(batch_rows=4, pad_id=0, max_length=64, pack=pack, group_by_length=group)
    run = _take(iter(pl.train_dataset(exs, seed=7, **kw)), 12)  # > 1 epoch: the reshuffle is covered too
    again = _take(iter(pl.train_dataset(exs, seed=7, **kw)), 12)
    other = _take(iter(pl.train_dataset(exs, seed=8, **kw)), 12)
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert any(a["input_ids"].shape != b["input_ids"].shape or (a["input_ids"] != b["input_ids"]).any()
               for a, b in zip(run, other))
    it = iter(pl.train_dataset(exs, seed=7, **kw))
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores it as JSON
    fresh = iter(pl.train_dataset(exs, seed=7, **kw))
    fresh.set_state(state)
    for a, b in zip(_take(fresh, 7), run[5:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_unpacked_batches_pad_to_buckets_and_cover_each_epoch_once():
    exs = _examples(24)
    it = iter(pl.train_dataset(exs, batch_rows=4, seed=0, pad_id=0, max_length=64, pack=False, buckets=(16, 32, 64)))
    seen = []
    for b in _take(it, 6):
        assert b["input_ids"].shape[1] in (16, 32)
        lengths = (b["segment_ids"] > 0).sum(1)
        assert b["input_ids"].shape[1] == (16 if lengths.max() <= 16 else 32)
        for row, n in zip(b["input_ids"], lengths):
            seen.append(int(row[0]) // 1000)
            assert (row[n:] == 0).all()
    assert sorted(seen) == list(range(24))


def test_length_grouping_batches_similar_lengths_within_each_window():
    """48 examples, 4 rows a batch, windows of 3 batches: each window's 12 examples, sorted by length
    and cut in fours, must be exactly its 3 batches (in some order); every epoch covers each example
    once; and there is less padding than with the plain shuffle."""
    exs = _examples(48)
    length = {i: len(e["input_ids"]) for i, e in enumerate(exs)}
    kw = dict(batch_rows=4, seed=3, pad_id=0, max_length=64, pack=False, buckets=tuple(range(4, 65, 4)))
    grouped = _take(iter(pl.train_dataset(exs, group_by_length=3, **kw)), 24)  # two epochs
    plain = _take(iter(pl.train_dataset(exs, **kw)), 24)
    ids = [[int(r[0]) // 1000 for r in b["input_ids"]] for b in grouped]
    for epoch in (ids[:12], ids[12:]):
        assert sorted(i for b in epoch for i in b) == list(range(48))
        for w in range(0, 12, 3):
            window = [i for b in epoch[w:w + 3] for i in b]
            by_length = sorted(length[i] for i in window)
            want = sorted(by_length[k:k + 4] for k in range(0, 12, 4))
            assert sorted(sorted(length[i] for i in b) for b in epoch[w:w + 3]) == want
    assert ids[:12] != ids[12:]  # each epoch reshuffled
    fill = lambda bs: np.mean([(b["segment_ids"] > 0).mean() for b in bs])  # noqa: E731
    assert fill(grouped) > fill(plain) + 0.1


def test_packing_keeps_examples_whole_with_restarting_positions():
    exs = _examples(40, seed=3)
    it = iter(pl.train_dataset(exs, batch_rows=4, seed=1, pad_id=0, max_length=64, pack=True))
    segments = 0
    for b in _take(it, 4):
        assert b["input_ids"].shape == (4, 64)
        for ids, lab, seg, pos in zip(b["input_ids"], b["labels"], b["segment_ids"], b["positions"]):
            for s in np.unique(seg[seg > 0]):
                sel = seg == s
                span = np.flatnonzero(sel)
                assert (np.diff(span) == 1).all()  # contiguous
                ex = exs[int(ids[sel][0]) // 1000]
                np.testing.assert_array_equal(ids[sel], ex["input_ids"])
                np.testing.assert_array_equal(lab[sel], ex["labels"])
                np.testing.assert_array_equal(pos[sel], np.arange(sel.sum()))
                segments += 1
            assert (lab[seg == 0] == -100).all()
    assert segments > 16  # several examples share a row


def test_place_batch_splits_micro_batches_over_data_axes():
    mesh = make_mesh((2, 2, 2))
    b = pl.pad_examples(_examples(8), (32,), 0)
    placed = pl.place_batch(b, mesh, accum_steps=2)
    x = placed["input_ids"]
    assert x.shape == (2, 4, 32)
    assert x.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(x).reshape(8, 32), b["input_ids"])
    with pytest.raises(ValueError, match="data\\*fsdp=4"):
        pl.place_batch(pl.pad_examples(_examples(6), (32,), 0), mesh, accum_steps=1)


def test_score_positions_list_each_rows_labelled_tokens():
    labels = np.full((2, 10), -100, np.int32)
    labels[0, [2, 5, 9]] = [1, 0, 1]
    labels[1, [4]] = [1]
    out = pl.with_score_positions({"labels": labels})
    assert out["score_positions"].tolist() == [[2, 5, 9, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    assert out["score_labels"].tolist() == [[1, 0, 1] + [-100] * 5, [1] + [-100] * 7]
    many = np.zeros((1, 40), np.int32)  # 40 labelled tokens -> the next power of two
    assert pl.with_score_positions({"labels": many})["score_positions"].shape == (1, 64)
