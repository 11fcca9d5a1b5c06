import pytest
import torch
import torch.nn.functional as F

from pfedsam_nvflare.model import ModelConfig, Partition, PFedSAM, build_backbone, build_pfedsam
from pfedsam_nvflare.model.adapters import AdaptedLinear, ExpertMixture


def _plain_sam_logits(backbone, images):
    """The un-adapted backbone, driven the way SAM itself is: encoder, no prompts, first mask token."""
    sam = backbone.sam.eval()
    mean = torch.tensor(backbone.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.pixel_std).view(1, 3, 1, 1)
    embeddings = sam.image_encoder((images.expand(-1, 3, -1, -1) - mean) / std)
    outputs = []
    for embedding in embeddings:
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = sam.mask_decoder(
            image_embeddings=embedding[None],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        outputs.append(masks)
    logits = torch.cat(outputs)
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", ["tiny", "lite_medsam"])
@pytest.mark.parametrize("decoder", ["full", "lora"])
@torch.no_grad()
def test_adapted_model_starts_equal_to_sam(name, decoder):
    config = ModelConfig(backbone=name, decoder=decoder)
    model = build_pfedsam(config).eval()
    size = model.image_size
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    reference = _plain_sam_logits(build_backbone(name), images)
    personalized = model(images)
    with model.global_only():
        global_only = model(images)
    assert personalized.shape == (2, 1, size, size)
    torch.testing.assert_close(personalized, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(global_only, reference, rtol=1e-4, atol=1e-4)
    # the comparison is able to fail: once the experts' B is not zero the paths differ
    for module in model.modules():
        if isinstance(module, ExpertMixture):
            module.up.normal_()
    assert not torch.allclose(model(images), reference, atol=1e-3)
    with model.global_only():
        torch.testing.assert_close(model(images), reference, rtol=1e-4, atol=1e-4)


def test_every_attention_block_is_adapted_or_only_the_last_ones():
    every = build_pfedsam(ModelConfig(backbone="tiny"))
    assert len(every.adapted) == 4
    last = build_pfedsam(ModelConfig(backbone="tiny", adapted_blocks=2))
    attentions = [m for m in last.sam.image_encoder.modules() if hasattr(m, "qkv")]
    assert [isinstance(a.qkv, AdaptedLinear) for a in attentions] == [False, False, True, True]
    assert last.cache_start == 3  # stem and the two frozen blocks are cached
    with pytest.raises(ValueError, match="adapted_blocks=5 but tiny has 4"):
        build_pfedsam(ModelConfig(backbone="tiny", adapted_blocks=5))


@torch.no_grad()
def test_cached_prefix_gives_the_same_output():
    model = build_pfedsam(ModelConfig(backbone="tiny", adapted_blocks=2)).eval()
    images = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(model(prefix=model.encode_prefix(images)), model(images))


@torch.no_grad()
def test_multi_label_and_box_prompts():
    model = build_pfedsam(ModelConfig(backbone="tiny", num_labels=2, prompt="box")).eval()
    images = torch.rand(2, 3, 64, 64)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0]])
    logits = model(images, boxes)
    assert logits.shape == (2, 2, 64, 64)
    # each image is decoded with its own box
    assert torch.allclose(model(images[1:], boxes[1:]), logits[1:], atol=1e-5)
    assert not torch.allclose(model(images[1:], boxes[:1]), logits[1:], atol=1e-3)
    with pytest.raises(ValueError, match="needs boxes"):
        model(images)


@torch.no_grad()
def test_a_batch_decodes_like_its_images_one_at_a_time():
    model = build_pfedsam(ModelConfig(backbone="tiny", num_labels=2, prompt="box", decoder="lora", decoder_experts=True))
    for parameter in [*model.global_parameters(), *model.local_parameters()]:
        parameter.normal_(std=0.1)  # adapters that have learned something
    model.eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0], [20.0, 10.0, 50.0, 60.0]])
    batched = model(images, boxes)
    one_at_a_time = torch.cat([model(images[i : i + 1], boxes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, one_at_a_time, rtol=1e-5, atol=1e-5)


def test_wrong_image_shape_is_named():
    model = build_pfedsam(ModelConfig(backbone="tiny"))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1 or 3, 64, 64\), got \(1, 3, 32, 32\)"):
        model(torch.rand(1, 3, 32, 32))


def test_too_many_labels():
    with pytest.raises(ValueError, match="num_labels=5 is too many"):
        build_pfedsam(ModelConfig(backbone="tiny", num_labels=5))


def test_expert_gates_top_k_and_balance():
    torch.manual_seed(0)
    mixture = ExpertMixture(16, 8, num_experts=4, rank=2, alpha=2.0, top_k=2)
    x = torch.randn(5, 7, 16)
    gates = mixture.gates(x)
    assert gates.shape == (5, 4)
    assert torch.allclose(gates.sum(-1), torch.ones(5))
    assert ((gates > 0).sum(-1) == 2).all()
    mixture = ExpertMixture(16, 8, num_experts=4, rank=2, alpha=2.0, top_k=None)
    with torch.no_grad():
        mixture.router.weight.zero_()
        mixture.router.bias.zero_()  # uniform gates over all four experts
    mixture(x)
    assert torch.isclose(mixture.balance_loss, torch.tensor(1.0))
    with torch.no_grad():
        mixture.router.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))  # every sequence on expert 0
    mixture(x)
    assert mixture.balance_loss > 3.99  # collapse costs up to num_experts


def test_backbone_batch_norm_stays_frozen_in_training_mode():
    model: PFedSAM = build_pfedsam(ModelConfig(backbone="lite_medsam", adapted_blocks=2)).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.sam.mask_decoder.training


def test_decoder_experts_are_local_and_switched_off_on_the_global_path():
    model = build_pfedsam(ModelConfig(backbone="tiny", decoder="lora", decoder_experts=True))
    partition = Partition.of(model)
    decoder_local = [k for k in partition.local_keys if k.startswith("sam.mask_decoder.")]
    assert decoder_local and all(".experts." in k for k in decoder_local)
    assert not any(".experts." in k for k in partition.global_keys)
    for module in model.modules():
        if isinstance(module, ExpertMixture):
            module.up.data.normal_()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), model.global_only():
        global_only = model(images)
    plain = build_pfedsam(ModelConfig(backbone="tiny", decoder="lora", num_experts=0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".experts." not in k})
    with torch.no_grad():
        torch.testing.assert_close(global_only, plain(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decoder_experts needs decoder='lora'"):
        ModelConfig(backbone="tiny", decoder="full", decoder_experts=True)
