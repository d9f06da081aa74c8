"""Evaluation metrics on hand-computed cases and against plain-loop restatements of the definitions."""
import json
import math

import numpy as np
import pytest

from prm_jax.evaluation import best_of_n, metrics
from prm_jax.evaluation.processbench import load_subset


# -- ProcessBench ----------------------------------------------------------------------------

def test_first_error_is_first_step_strictly_below_threshold():
    assert metrics.first_error([0.9, 0.4, 0.2], 0.5) == 1
    assert metrics.first_error([0.9, 0.4, 0.2], 0.1) == -1
    assert metrics.first_error([0.5, 0.5], 0.5) == -1  # equal is not below
    assert metrics.first_error([0.1], 0.5) == 0
    assert metrics.first_error([], 0.5) == -1  # no scored step: no error predicted


def test_subset_metrics_hand_computed():
    # erroneous: labels 0, 2, 1 -> preds 0 (hit), 1 (miss), 1 (hit): 2/3
    # correct:   two samples    -> preds -1 (hit), 0 (miss): 1/2
    m = metrics.subset_metrics([0, 2, -1, -1, 1], [0, 1, -1, 0, 1])
    assert (m.n_error, m.n_correct) == (3, 2)
    assert m.acc_error == pytest.approx(2 / 3)
    assert m.acc_correct == pytest.approx(1 / 2)
    assert m.f1 == pytest.approx(4 / 7)  # 2 * (2/3)(1/2) / (2/3 + 1/2)


def test_subset_metrics_degenerate_cases():
    m = metrics.subset_metrics([0, 1], [0, 1])  # no correct samples: acc_correct undefined
    assert m.acc_error == 1.0 and math.isnan(m.acc_correct) and math.isnan(m.f1)
    assert m.to_json()["acc_correct"] is None and m.to_json()["f1"] is None
    assert metrics.subset_metrics([0, -1], [1, 0]).f1 == 0.0  # both accuracies 0
    # saying "no error" everywhere: acc_correct 1, acc_error 0 -> F1 0 (no constant baseline scores)
    assert metrics.subset_metrics([0, 3, -1], [-1, -1, -1]).f1 == 0.0


def test_average_is_unweighted_mean_of_subsets():
    assert metrics.average_f1([0.2, 0.4, 0.9]) == pytest.approx(0.5)


def test_preds_at_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    scores = [rng.random(int(n)).tolist() for n in rng.integers(0, 7, 40)]
    thresholds = np.array([0.0, 0.05, 0.3, 0.5, 0.77, 1.0, 1.01])
    got = metrics.preds_at(scores, thresholds)
    for a, t in enumerate(thresholds):
        assert got[a].tolist() == [metrics.first_error(s, t) for s in scores]


def test_tune_threshold_hand_case():
    # Any threshold in (0.3, 0.7] gets all three right: A's error at 1, B error-free, C's error at 0.
    scores = [[0.9, 0.3], [0.8, 0.7], [0.2, 0.9]]
    labels = [1, -1, 0]
    t, f1 = metrics.tune_threshold(scores, labels)
    assert 0.3 < t <= 0.7 and f1 == 1.0
    assert metrics.subset_metrics(labels, [metrics.first_error(s, t) for s in scores]).f1 == 1.0


def test_tune_threshold_is_at_least_as_good_as_any_grid_threshold():
    rng = np.random.default_rng(1)
    labels, scores = [], []
    for _ in range(60):
        n = int(rng.integers(1, 6))
        lab = int(rng.integers(-1, n))
        s = rng.uniform(0.4, 1.0, n)
        if lab >= 0:
            s[lab] = rng.uniform(0.0, 0.7)
        labels.append(lab)
        scores.append(s.tolist())

    def f1_at(t):  # the official definition, restated with plain loops
        preds = [next((i for i, x in enumerate(s) if x < t), -1) for s in scores]
        err = [p == y for p, y in zip(preds, labels) if y >= 0]
        cor = [p == -1 for p, y in zip(preds, labels) if y == -1]
        a, b = sum(err) / len(err), sum(cor) / len(cor)
        return 0.0 if a + b == 0 else 2 * a * b / (a + b)

    t, f1 = metrics.tune_threshold(scores, labels)
    assert f1 == pytest.approx(f1_at(t))
    assert f1 >= max(f1_at(g) for g in np.linspace(0, 1, 201)) - 1e-12


def test_load_subset_real_counts_and_balanced_limit(shared_data, capsys):
    d = str(shared_data / "processbench")
    full = load_subset(d, "gsm8k")
    assert len(full) == 400 and "warning" not in capsys.readouterr().out
    head = load_subset(d, "gsm8k", limit=5)
    assert sum(s.label >= 0 for s in head) == 3 and sum(s.label == -1 for s in head) == 2
    raw = json.load(open(shared_data / "processbench" / "gsm8k.json"))
    first_err = next(r for r in raw if r["label"] >= 0)
    assert head[0].id == first_err["id"] and list(head[0].steps) == first_err["steps"]


def test_load_subset_reports_bad_records(tmp_path, capsys):
    (tmp_path / "gsm8k.json").write_text(json.dumps([
        {"id": "a", "generator": "g", "problem": "p", "steps": ["s"], "final_answer_correct": True, "label": -1},
        {"id": "b", "generator": "g", "problem": "p", "steps": ["s"], "final_answer_correct": True, "label": 3},
    ]))
    with pytest.raises(ValueError, match=r"gsm8k.json: sample 1: key 'label' is 3"):
        load_subset(str(tmp_path), "gsm8k")
    (tmp_path / "math.json").write_text(json.dumps([
        {"id": "a", "generator": "g", "problem": "p", "steps": ["s"], "final_answer_correct": True, "label": -1}]))
    assert len(load_subset(str(tmp_path), "math")) == 1
    assert "has 1 samples; the published math subset has 1000" in capsys.readouterr().out


# -- aggregation and the minimum's position ---------------------------------------------------

def test_aggregation_one_step_and_empty():
    for how in metrics.AGGREGATIONS:
        assert metrics.aggregate([0.37], how) == pytest.approx(0.37)
        assert metrics.aggregate([], how) is None  # no step token left after truncation
    s = [0.5, 0.8, 0.25]
    assert metrics.aggregate(s, "product") == pytest.approx(0.1)
    assert metrics.aggregate(s, "min") == 0.25
    assert metrics.aggregate(s, "last") == 0.25
    assert metrics.aggregate(s, "mean") == pytest.approx(1.55 / 3)
    with pytest.raises(ValueError, match="aggregation 'max'"):
        metrics.aggregate(s, "max")


def test_argmax_ties_and_unscored():
    assert metrics.argmax_first([0.2, 0.7, 0.7]) == 1  # tie -> earliest
    assert metrics.argmax_first([None, 0.1, None]) == 1  # unscored ranks below any score
    assert metrics.argmax_first([None, None]) == 0
    assert metrics.argmax_first([]) == -1


def test_min_position_ties_single_and_share():
    assert metrics.min_position([0.3, 0.5, 0.3]) == (0, 0.0)  # tie -> earliest step
    assert metrics.min_position([0.9]) == (0, 1.0)  # a single step is the final step
    assert metrics.min_position([0.9, 0.8, 0.7, 0.1, 0.5]) == (3, 0.75)
    assert metrics.min_position([]) is None
    scores = [[0.9, 0.1], [0.1, 0.9], [0.5], [0.2, 0.2], [], [0.9, 0.2]]
    n_steps = [2, 2, 1, 2, 3, 4]  # the last two are truncated: excluded
    assert metrics.min_at_last_share(scores, n_steps) == (0.5, 4)


# -- Best-of-N selection ----------------------------------------------------------------------

def test_group_of_problem_id_suffix_and_text():
    assert best_of_n.group_of({"id": "gsm8k-12-3", "problem": "p"}) == ("gsm8k-12", 3)
    assert best_of_n.group_of({"id": "x-3", "problem_id": "q7", "problem": "p"}) == ("q7", 3)
    assert best_of_n.group_of({"id": "abc", "problem": "what?"}) == ("problem:what?", None)


def test_n_values():
    assert best_of_n.n_values(8) == [1, 2, 4, 8]
    assert best_of_n.n_values(6) == [1, 2, 4, 6]
    assert best_of_n.n_values(1) == [1]


def test_majority_pick_ties_and_no_votes():
    assert best_of_n.majority_pick(["a", "b", "b", "a", "c"]) == 0  # a and b tie: a was seen first
    assert best_of_n.majority_pick(["a", "b", "b"]) == 1
    assert best_of_n.majority_pick([None, None]) == -1
    assert best_of_n.majority_pick([None, "x"]) == 1


def test_bon_curve_hand_computed():
    groups = [
        # correct answer only at index 2; PRM prefers index 2; majority is the wrong "w"
        {"correct": [False, False, True, False], "votes": ["w", "w", "<gold>", "v"], "scores": [0.1, 0.2, 0.9, 0.3]},
        # all right
        {"correct": [True, True, True, True], "votes": ["<gold>"] * 4, "scores": [0.5, None, 0.5, 0.5]},
        # first is right, PRM picks index 1 (wrong); majority (2 of 4) right
        {"correct": [True, False, True, False], "votes": ["<gold>", "u", "<gold>", "z"],
         "scores": [0.4, 0.6, 0.5, None]},
    ]
    curve = best_of_n.bon_curve(groups, [1, 2, 4])
    assert curve[0] == {"n": 1, "prm": 2 / 3, "maj": 2 / 3, "pass": 2 / 3}
    assert curve[1] == {"n": 2, "prm": 1 / 3, "maj": 2 / 3, "pass": 2 / 3}  # g3: tie u/<gold> -> <gold> first
    assert curve[2] == {"n": 4, "prm": 2 / 3, "maj": 2 / 3, "pass": 1.0}


def test_load_responses_groups_by_id_and_reports_bad_lines(tmp_path):
    recs = [{"id": "p1-1", "problem": "A", "answer": "2", "steps": ["s"], "final_answer": "2"},
            {"id": "p1-0", "problem": "A", "answer": "2", "steps": ["s", "t"], "final_answer": None},
            {"id": "p2-0", "problem": "B", "answer": "3", "steps": ["u"], "final_answer": "3"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    responses = best_of_n.load_responses(str(path))
    groups = best_of_n.group_responses(responses)
    assert {k: [responses[i].id for i in v] for k, v in groups.items()} == {"p1": ["p1-0", "p1-1"], "p2": ["p2-0"]}
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps({"id": "p1-2", "problem": "A", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: missing key 'steps'"):
        best_of_n.load_responses(str(path))
    bad = dict(recs[1], answer="5")
    path.write_text(json.dumps(recs[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"problem 'p1': its responses disagree on the gold answer"):
        best_of_n.group_responses(best_of_n.load_responses(str(path)))
