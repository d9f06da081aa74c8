"""A real Tunix GRPO training step consumes prm_jax.rewards.process_reward.

Tunix's own pieces: RLCluster with the vanilla rollout (Tunix's sampler) on a tiny Tunix Qwen2 policy
(one logit masked, see Policy), GRPOLearner, its advantage estimator and its loss. Only the reward is ours: a tiny
random PRM (spread_tiny_prm) scored on the test mesh. One training step, then checks against
independent references: the completions the reward function saw are the ones the rollout produced;
the rewards it returned equal the offline scorer's step scores on the hand-split completions,
aggregated by hand; the rewards and advantages the learner logged and trained on equal those and
GRPO's group-normalised advantages computed here; the policy's parameters moved.

google-tunix==0.1.5 is in the test extra (pyproject.toml says why that release); without tunix this
file skips.
"""
import math

import numpy as np
import pytest

pytest.importorskip("tunix.rl.grpo.grpo_learner",
                    reason="google-tunix is not installed (pip install -e '.[test]' brings google-tunix==0.1.5)")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.qwen2 import model as tunix_qwen2  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner as grpo_lib  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402

from conftest import spread_tiny_prm  # noqa: E402
from prm_jax.rewards import process_reward, strip_special_tail  # noqa: E402

# Tunix 0.1.5 on jax 0.10 / flax 0.12 warns about `with mesh:`, `.value` and more, dozens of times a step
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROBLEMS = ["Tom has 3 apples and buys 12 more. How many apples does he have?", "What is 15 * 4 - 7?"]
G = 2  # completions per prompt
MAX_LEN, BUCKETS = 256, (128, 256)


class Policy(tunix_qwen2.Qwen2, pytree=False):
    """Tunix's Qwen2, except that it never writes the PRM's step token: the toy tokenizer shares its
    vocabulary with the PRM, and a step token inside a completion is an error for the scorer (a real
    policy's tokenizer has no such token)."""

    def __init__(self, config, *, forbidden: int, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.forbidden = forbidden

    def __call__(self, *args, **kwargs):
        logits, cache = super().__call__(*args, **kwargs)
        return logits.at[..., self.forbidden].set(-1e9), cache


def tiny_policy(vocab_size: int, forbidden: int, mesh) -> Policy:
    """A one-layer Tunix Qwen2. Its constructor zero-initialises the MLP (a checkpoint then overwrites it),
    which would leave the MLP without a gradient: those kernels get random values here (Tunix's
    dummy_model_creator does the same for every weight, but compiles once per shape, ~10 s)."""
    config = tunix_qwen2.ModelConfig(num_layers=1, vocab_size=vocab_size, embed_dim=32, hidden_dim=64, num_heads=2,
                                     head_dim=16, num_kv_heads=1, rope_theta=10_000, norm_eps=1e-6,
                                     use_tied_embedding=True)
    with jax.set_mesh(mesh):  # Tunix's Qwen2 annotates its weights with fsdp/tp shardings
        policy = Policy(config, forbidden=forbidden, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for proj in (policy.layers[0].mlp.gate_proj, policy.layers[0].mlp.up_proj, policy.layers[0].mlp.down_proj):
        k = proj.kernel
        k.set_value(jax.device_put(rng.normal(0, 0.1, k.shape).astype(np.float32), k.get_value().sharding))
    return policy


def grpo_advantages(rewards, group):
    """GRPO's group-relative advantage (arXiv 2402.03300, eq. in sec. 4.1.2), with Tunix's std(ddof=1) + 1e-4."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


def test_grpo_learner_step_consumes_the_reward(toy_tokenizer, mesh):
    prm = spread_tiny_prm(len(toy_tokenizer), seed=1)
    # a space as the step separator, so the random policy's completions have several steps each
    reward_fn = process_reward(prm, toy_tokenizer, "prod", step_split=" ", mesh=mesh, batch_size=8,
                               max_length=MAX_LEN, buckets=BUCKETS)
    step_id = reward_fn.scorer.step_token_id
    calls = []

    def prm_process_reward(prompts, completions, **kwargs):  # records what the learner passes and gets back
        out = reward_fn(prompts=prompts, completions=completions, **kwargs)
        calls.append({"prompts": list(prompts), "completions": list(completions), "kwargs": kwargs, "rewards": out})
        return out

    # Tunix 0.1.5 shards with Auto axes (Explicit ones reject its embedding gather); one device is plenty
    policy_mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                                axis_types=(jax.sharding.AxisType.Auto,) * 2)
    policy = tiny_policy(len(toy_tokenizer), step_id, policy_mesh)
    before = jax.tree.map(np.array, nnx.state(policy, nnx.Param))
    cluster = rl_cluster_lib.RLCluster(
        actor=policy, tokenizer=toy_tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: policy_mesh for role in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                                         rl_cluster_lib.Role.ROLLOUT)},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=optax.sgd(0.1), eval_every_n_steps=10,
                                                            max_steps=1),
            rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=12, max_prompt_length=64,
                                                      kv_cache_size=96, temperature=1.0, seed=jax.random.key(3))))
    rollouts, logged, seen = [], [], []
    generate = cluster.generate

    def spy_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        rollouts.append(list(out.text))
        return out

    cluster.generate = spy_generate
    cluster.with_external_metrics_logger(logged.append)

    def capture(prompts, completions, rewards, **kwargs):  # Tunix 0.1.5 names the advantages `advances`
        seen.append({"rewards": np.asarray(rewards), "advantages": np.asarray(kwargs.get("advantages",
                                                                                         kwargs.get("advances")))})
        return {}

    learner = grpo_lib.GRPOLearner(rl_cluster=cluster, reward_fns=[prm_process_reward], metric_fns=[capture],
                                   algo_config=grpo_lib.GRPOConfig(num_generations=G, num_iterations=1, beta=0.0))
    prompts = [toy_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROBLEMS]
    # one batch as Tunix's grain pipelines give it: numpy arrays, which the learner repeats G times
    learner.train([{"prompts": np.array(prompts), "question": np.array(PROBLEMS)}])

    # the reward function saw the learner's rollout, each prompt G times, with the batch's other fields
    assert len(calls) == 1 and len(rollouts) == 1
    call = calls[0]
    assert call["completions"] == rollouts[0] and len(call["completions"]) == len(PROBLEMS) * G
    assert call["prompts"] == [p for p in prompts for _ in range(G)]
    assert list(call["kwargs"]["question"]) == [q for q in PROBLEMS for _ in range(G)]

    # its rewards are the offline scorer's step scores, split and aggregated by hand
    scorer = reward_fn.scorer  # PRMScorer (checked against transformers in test_eval_run); no second compile
    specials = toy_tokenizer.all_special_tokens
    items = [(q, [w for w in strip_special_tail(c, specials).split(" ") if w.strip()])
             for q, c in zip(call["kwargs"]["question"], call["completions"])]
    assert all(steps for _, steps in items) and max(len(steps) for _, steps in items) > 1, items
    step_scores = scorer.score(items)
    want = [math.prod(s) for s in step_scores]
    np.testing.assert_allclose(call["rewards"], want, atol=1e-5)
    assert any(math.prod(s) < min(s) - 1e-3 for s in step_scores)  # prod is neither min nor last here
    assert len(set(np.round(want, 4))) == len(want)  # distinct rewards, so every advantage is non-zero

    # the learner trained on exactly those rewards and their group-relative advantages
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0]["rewards"], call["rewards"], atol=1e-6)
    np.testing.assert_allclose(seen[0]["advantages"], grpo_advantages(call["rewards"], G), rtol=1e-4, atol=1e-4)
    logged_metrics = {}
    for buf in logged:
        if buf.mode == "train":
            for name, (values, _) in buf.metrics.items():
                logged_metrics.setdefault(name, []).extend(values)
    np.testing.assert_allclose(logged_metrics["rewards/prm_process_reward"], call["rewards"], atol=1e-6)
    assert logged_metrics["completions"] == call["completions"]

    # one optimizer step moved the policy
    assert learner.rl_cluster.actor_trainer.train_steps == 1
    after = jax.tree.map(np.array, nnx.state(learner.rl_cluster.actor_trainer.model, nnx.Param))
    moved = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))[0]
    assert all(m for _, m in moved), [jax.tree_util.keystr(k) for k, m in moved if not m]
    losses = learner.rl_cluster.actor_trainer.metrics_logger.get_metric_history("actor", "loss", "train")
    assert len(losses) == 1 and np.isfinite(losses[0])
