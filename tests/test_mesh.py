"""Sharded execution on the 8 fake CPU devices equals the single-device model."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prm_jax import load_causal_lm, load_prm, save_hf
from prm_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from prm_jax.parallel.mesh import create_sharded, make_mesh, parse_mesh_spec, shard_batch, state_shardings

CFG = Qwen2Config.preset("tiny", vocab_size=128)  # hidden 64, 4 heads x 16, 2 kv heads, mlp 128: all divide by 4


def batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, CFG.vocab_size, (8, 12))
    mask = (np.arange(12)[None, :] < rng.randint(3, 13, (8, 1))).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def reference():
    """Single-device model (eager) and its logits on a right-padded batch."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(CFG, nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(Qwen2ForCausalLM(CFG, nnx.Rngs(0))))())
    ids, mask = batch()
    return model, sharded_forward(model, None, ids, mask)


_JIT_CACHE = {}


def sharded_forward(model, mesh, ids, mask):
    graphdef, state = nnx.split(model)
    if graphdef not in _JIT_CACHE:  # reuse the compile when shapes and shardings repeat
        _JIT_CACHE[graphdef] = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return np.asarray(_JIT_CACHE[graphdef](state, *shard_batch((ids, mask), mesh)))


@pytest.mark.parametrize("shape,q_spec,embed_spec", [
    ((8, 1, 1), P(None, None), P(None, None)),
    ((2, 2, 2), P("fsdp", "tensor"), P("tensor", "fsdp")),
    ((1, 2, 4), P("fsdp", "tensor"), P("tensor", "fsdp")),
])
def test_sharded_forward_equals_single_device(reference, shape, q_spec, embed_spec):
    single, expected = reference
    mesh = make_mesh(shape)
    if shape == (1, 2, 4):  # born sharded from the same seed (one jit per mesh, so only here)
        model = create_sharded(lambda: Qwen2ForCausalLM(CFG, nnx.Rngs(0)), mesh)
    else:  # the single-device weights placed by the rules table
        graphdef, state = nnx.split(single)
        model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.kernel[...].sharding.spec == q_spec
    assert model.model.embed_tokens.embedding[...].sharding.spec == embed_spec
    assert model.lm_head.kernel[...].sharding.spec == P(*reversed(embed_spec))
    assert layer.mlp.down_proj.kernel[...].sharding.spec == P(*reversed(q_spec))
    assert layer.input_layernorm.scale[...].sharding.spec == P(None)
    if shape == (1, 2, 4):  # each device really holds a quarter x half of the kernel
        shards = layer.mlp.up_proj.kernel[...].addressable_shards
        assert len(shards) == 8 and shards[0].data.shape == (32, 32)
    np.testing.assert_allclose(np.asarray(layer.mlp.up_proj.kernel[...]),
                               np.asarray(single.model.layers[1].mlp.up_proj.kernel[...]), atol=1e-6)
    ids, mask = batch()
    got = sharded_forward(model, mesh, ids, mask)
    valid = mask == 1
    assert np.abs(got - expected)[valid].max() <= 1e-5


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,fsdp=-1,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_spec("fsdp=-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert make_mesh("data=1,fsdp=2,tensor=4").shape == {"data": 1, "fsdp": 2, "tensor": 4}
    for bad, msg in [("data=3", "uses 3 devices, but 8"), ("data=3,fsdp=-1", "do not divide by 3"),
                     ("data=-1,fsdp=-1", "only one axis may be -1"), ("pipe=2", "got 'pipe=2'"),
                     ("data=0,fsdp=-1", "must be >= 1"), ("data=two", "got 'data=two'")]:
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh((2, 2, 1))


def test_load_with_mesh_gives_sharded_arrays(reference, tmp_path):
    single, expected = reference
    save_hf(single, tmp_path)
    model = load_causal_lm(tmp_path, mesh="data=1,fsdp=2,tensor=4")
    kernel = model.model.layers[0].self_attn.k_proj.kernel[...]
    assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32, 8)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(single.model.layers[0].self_attn.k_proj.kernel[...]))
    ids, mask = batch()
    got = sharded_forward(model, model.model.layers[0].self_attn.k_proj.kernel[...].sharding.mesh, ids, mask)
    assert np.abs(got - expected)[mask == 1].max() <= 1e-5

    prm = load_prm(tmp_path, mesh=make_mesh((2, 2, 2)))  # backbone streamed, fresh score head born sharded
    abstract = nnx.state(prm, nnx.Param)
    wanted = dict(nnx.to_flat_state(state_shardings(abstract, make_mesh((2, 2, 2)))))
    for path, var in nnx.to_flat_state(abstract):
        assert var.get_value().sharding.spec == wanted[path].spec, path
    assert prm.score.dense_in.kernel[...].sharding.spec == P("fsdp", "tensor")
