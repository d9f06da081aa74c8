"""The re-deriving judge (toyworld.rederive) against the toy world's checker."""
from prm_jax.toyworld import rederive, world
from prm_jax.toyworld.critic import _expected_steps
from prm_jax.toyworld.world import check_steps

W = {"start": 7, "ops": [["+", 5], ["-", 3], ["*", 2]]}  # 7 -> 12 -> 9 -> 18


def oracle(worlds):
    """A critic that always writes the right next step (of the kind the lead-in names)."""
    def continue_steps(requests):
        out = []
        for problem, steps, lead in requests:
            w = world.world_of(worlds[problem])
            probe = list(steps) + [f"{lead} 0 + 0 = 0" if lead else "0 + 0 = 0"]
            expected = _expected_steps(w, probe, len(steps))[-1]
            done = 0
            for step in probe:
                done = world._advance(world.parse_step(step), done)
            if not lead.startswith("Check") and done == len(w["ops"]):  # the last operation states the answer
                expected += f". The answer is \\boxed{{{world.running_values(w)[-1]}}}."
            out.append(expected if expected.startswith(lead) else f"{lead} {expected}")
        return out
    return continue_steps


def test_a_critic_that_solves_finds_every_first_error_the_checker_finds():
    problems = world.generate_problems(60, seed=5)
    sols = world.sample_solutions(problems, seed=2, error_rate=0.7, restart_rate=0.5, check_rate=0.5, slip_rate=0.3)
    sols += world.sample_solutions(problems, seed=3, error_rate=0.0, check_rate=0.5)
    sols.append({**problems[0], "id": "free-form", "steps": ["no idea", "The answer is \\boxed{3}."]})
    problems.append({**W, "problem": "W"})
    sols += [{**W, "problem": "W", "steps": ["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18"]},  # no answer stated
             {**W, "problem": "W", "steps": ["7 + 5 = 12. The answer is \\boxed{12}."]}]  # answers too early
    judged = rederive.rederive_judge(sols, oracle({p["problem"]: p for p in problems}), "oracle")
    assert [r["judge"]["first_error"] for r in judged] == [check_steps(s, s["steps"]).first_error for s in sols]
    assert {check_steps(s, s["steps"]).reason for s in sols} >= {
        None, "wrong_check", "wrong_operand", "arithmetic", "missing_answer", "premature_answer", "unparseable"}


def test_the_critic_never_sees_the_step_it_checks_and_its_mistakes_become_the_verdict():
    seen = []

    def critic(requests):  # right at step 0, wrong (a false alarm) whenever it redoes step 1
        seen.extend(requests)
        return ["7 + 5 = 12" if not steps else "12 - 3 = 10" for _, steps, _ in requests]

    right = ["7 + 5 = 12", "12 - 3 = 9", "9 * 2 = 18. The answer is \\boxed{18}."]
    sols = [{**W, "problem": "P", "steps": right}, {**W, "problem": "P", "steps": ["7 + 4 = 11"] + right[1:]}]
    judged = rederive.rederive_judge(sols, critic, "scripted")
    assert [r["judge"]["first_error"] for r in judged] == [1, 0]
    assert [(p, tuple(s), lead) for p, s, lead in seen] == [("P", (), ""), ("P", (), ""), ("P", ("7 + 5 = 12",), "")]
    assert judged[0]["judge"]["raw"].splitlines() == ["Paragraph 0: 7 + 5 = 12; correct.",
                                                      "Paragraph 1: 12 - 3 = 10; incorrect."]


def test_check_and_restart_steps_are_rederived_from_their_lead_in():
    assert rederive.lead_in("Check: 12 - 5 = 7") == "Check:"
    assert rederive.lead_in("Start again: 7 + 5 = 12") == "Start again:"
    assert rederive.lead_in("She finds 5 more: 7 + 5 = 12") == ""
    assert rederive.same_step("She finds 5 more: 7 + 5 = 12", "He finds 5 more: 7 + 5 = 12")
    assert not rederive.same_step("7 + 5 = 12", "7 + 5 = 12. The answer is \\boxed{12}.")
    assert not rederive.same_step("no idea", "no idea")
