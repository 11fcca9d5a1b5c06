import pytest
import torch

from pfedsam_nvflare.model import ModelConfig, Partition, PartitionError, build_pfedsam

CONFIGS = [
    ModelConfig(backbone="tiny"),
    ModelConfig(backbone="tiny", decoder="lora", num_labels=2),
    ModelConfig(backbone="tiny", decoder="frozen", prompt="box", top_k=1),
    ModelConfig(backbone="tiny", adapted_blocks=1, num_experts=0),
    ModelConfig(backbone="tiny", full_finetune=True, num_experts=0),
]


def _trained(model):
    """Stand-in for training: every trainable weight moves."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.decoder}-{c.prompt}-e{c.num_experts}-ft{c.full_finetune}")
def test_every_trainable_parameter_is_in_exactly_one_set(config):
    model = build_pfedsam(config)
    partition = Partition.of(model)
    global_keys, local_keys, frozen_keys = map(set, (partition.global_keys, partition.local_keys, partition.frozen_keys))
    assert not global_keys & local_keys and not global_keys & frozen_keys and not local_keys & frozen_keys
    assert global_keys | local_keys | frozen_keys == set(model.state_dict())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == global_keys | local_keys
    assert bool(local_keys) == (config.num_experts > 0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.decoder}-{c.prompt}-e{c.num_experts}-ft{c.full_finetune}")
def test_split_then_load_round_trips_exactly(config):
    source = _trained(build_pfedsam(config))
    partition = Partition.of(source)
    global_state, local_state = partition.split(source.state_dict())
    target = build_pfedsam(config)
    partition.load_global(target, global_state)
    partition.load_local(target, local_state)
    target_state = target.state_dict()
    for key in (*partition.global_keys, *partition.local_keys):
        assert torch.equal(target_state[key], source.state_dict()[key]), key
    images = torch.rand(2, 3, 64, 64)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 2) if config.prompt == "box" else None
    with torch.no_grad():
        source_out = source.eval()(images, boxes)
        target_out = target.eval()(images, boxes)
    assert not torch.equal(source_out, build_pfedsam(config).eval()(images, boxes))
    assert torch.equal(source_out, target_out)


def test_the_sets_name_the_expected_modules():
    partition = Partition.of(build_pfedsam(ModelConfig(backbone="tiny", decoder="lora")))
    assert "sam.prompt_encoder.no_mask_embed.weight" in partition.global_keys
    assert "sam.image_encoder.blocks.0.attn.qkv.adapter.down" in partition.global_keys
    assert "sam.mask_decoder.transformer.layers.0.self_attn.q_proj.adapter.up" in partition.global_keys
    assert "sam.image_encoder.blocks.0.attn.qkv.experts.router.weight" in partition.local_keys
    assert "sam.mask_decoder.transformer.layers.0.self_attn.q_proj.base.weight" in partition.frozen_keys
    assert "sam.image_encoder.blocks.0.attn.qkv.base.weight" in partition.frozen_keys


def test_the_initial_global_partition_does_not_depend_on_the_experts():
    """A federation's starting point is the same whatever the L-MoE, so that an ablation of the experts starts
    every variant from one point; the seed still sets it."""
    base = dict(backbone="tiny", decoder="lora")
    variants = [{"num_experts": 0}, {"num_experts": 2}, {"num_experts": 8, "top_k": 2}, {"decoder_experts": True}]
    reference = build_pfedsam(ModelConfig(**base))
    partition = Partition.of(reference)
    expected = partition.state(reference, "global")
    for variant in variants:
        model = build_pfedsam(ModelConfig(**base, **variant))
        state = Partition.of(model).state(model, "global")
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected), variant
    other_seed = build_pfedsam(ModelConfig(**base, seed=1))
    seeded = Partition.of(other_seed).state(other_seed, "global")
    adapters = [key for key in expected if key.endswith(".adapter.down")]  # B starts at 0 whatever the seed
    assert adapters and not any(torch.equal(seeded[key], expected[key]) for key in adapters)


@pytest.fixture
def model_and_partition():
    model = build_pfedsam(ModelConfig(backbone="tiny"))
    return model, Partition.of(model)


def _unchanged(model, before):
    return all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_load_global_refuses_a_missing_key(model_and_partition):
    model, partition = model_and_partition
    state = {key: torch.zeros(partition.shapes[key]) for key in partition.global_keys}
    missing = partition.global_keys[3]
    del state[missing]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PartitionError, match=f"missing key '{missing}'"):
        partition.load_global(model, state)
    assert _unchanged(model, before)


def test_load_global_refuses_a_local_key(model_and_partition):
    model, partition = model_and_partition
    state = partition.state(model, "global")
    local_key = partition.local_keys[0]
    state[local_key] = torch.zeros(partition.shapes[local_key])
    with pytest.raises(PartitionError, match=f"unexpected key '{local_key}', a local-partition key"):
        partition.load_global(model, state)


def test_load_global_refuses_an_unknown_key(model_and_partition):
    model, partition = model_and_partition
    state = {**partition.state(model, "global"), "decoder.extra": torch.zeros(2)}
    with pytest.raises(PartitionError, match="unexpected key 'decoder.extra', not a key of this model"):
        partition.load_global(model, state)


def test_load_global_refuses_a_misshaped_key(model_and_partition):
    model, partition = model_and_partition
    state = partition.state(model, "global")
    key = partition.global_keys[-1]
    state[key] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PartitionError, match=f"key '{key}' has shape \\(3, 3\\), expected"):
        partition.load_global(model, state)
    assert _unchanged(model, before)


def test_load_local_refuses_a_global_key(model_and_partition):
    model, partition = model_and_partition
    state = {**partition.state(model, "local"), partition.global_keys[0]: torch.zeros(1)}
    with pytest.raises(PartitionError, match="a global-partition key"):
        partition.load_local(model, state)
