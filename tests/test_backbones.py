import pytest
import torch

from pfedsam_nvflare.model import CheckpointError, build_backbone
from pfedsam_nvflare.model.backbones import LITE_MEDSAM_SHA256, encoder_steps
from pfedsam_nvflare.model.checkpoints import load_checkpoint


def _run_steps(encoder, x):
    for step in encoder_steps(encoder):
        x = step(x)
    return x


@pytest.mark.parametrize("name", ["tiny", "lite_medsam"])
def test_encoder_steps_compose_to_the_encoder(name):
    backbone = build_backbone(name)
    encoder = backbone.sam.image_encoder.eval()
    x = torch.rand(1, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        assert torch.allclose(_run_steps(encoder, x), encoder(x), atol=1e-5)


def test_tiny_checkpoint_round_trips_through_a_file(tmp_path):
    original = build_backbone("tiny").sam
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(torch.randn_like(parameter))
    path = tmp_path / "tiny.pth"
    torch.save({"model": original.state_dict()}, path)
    loaded = build_backbone("tiny", path).sam
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny").sam.state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"tiny\.pth.*truncated or corrupted"):
        build_backbone("tiny", path)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    state = build_backbone("tiny").sam.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as raised:
        build_backbone("tiny", path)
    message = str(raised.value)
    assert "other.pth" in message and "mask_decoder.iou_token.weight" in message and "extra.weight" in message
    assert "prompt_encoder.no_mask_embed.weight (1, 7) vs (1, 32)" in message


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_key(tmp_path):
    state = build_backbone("tiny").sam.state_dict()
    state["mask_decoder.iou_token.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"nan\.pth does not fit this model: 1 keys with non-finite values \(mask_decoder\.iou_token\.weight"):
        build_backbone("tiny", path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth does not exist"):
        build_backbone("vit_b", tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match="vit_b needs the path"):
        build_backbone("vit_b")


def test_sha256_mismatch_is_refused(tmp_path):
    path = tmp_path / "lite_medsam.pth"
    torch.save(build_backbone("tiny").sam.state_dict(), path)
    with pytest.raises(CheckpointError, match=f"expected {LITE_MEDSAM_SHA256}"):
        load_checkpoint(build_backbone("tiny").sam, path, expected_sha256=LITE_MEDSAM_SHA256)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vit_x'"):
        build_backbone("vit_x")
