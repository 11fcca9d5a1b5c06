"""Record-level DP-SGD of the global phase: Opacus's clipping, noise and accountant on real per-sample gradients of
the tiny model."""

import pytest
import torch
from opacus.accountants import RDPAccountant
from sites import make_site

from pfedsam_nvflare.model import ModelConfig, Partition, build_pfedsam
from pfedsam_nvflare.training import LocalTrainer, SiteStateError, TrainerConfig
from pfedsam_nvflare.training.dp import DPConfig, PrivateSGD, per_sample_gradients
from pfedsam_nvflare.training.losses import SegmentationLoss
from pfedsam_nvflare.training.site_state import STATE_FILE

TINY = ModelConfig(backbone="tiny")
PLAIN = TrainerConfig(batch_size=4, kd_direction="none", lr_global=3e-3, lr_local=3e-3)


def _private(**dp) -> TrainerConfig:
    return TrainerConfig(**{**PLAIN.to_dict(), "dp": {"noise_multiplier": 1.0, "max_grad_norm": 0.5, **dp}})


def test_the_reported_epsilon_is_opacus_rdp_accountant_of_the_steps_taken(tmp_path):
    data = make_site(8, seed=3)  # 8 samples, batches of 4: sample rate 0.5, 2 steps a round
    trainer = LocalTrainer(TINY, _private(), data, None, tmp_path / "dp")
    plain = LocalTrainer(TINY, PLAIN, data, None, tmp_path / "plain")
    start = trainer.global_state()
    results = [trainer.run_round(start) for _ in range(3)]
    independent = RDPAccountant()
    for _ in range(3 * 2):
        independent.step(noise_multiplier=1.0, sample_rate=0.5)
    report = results[-1].privacy
    assert report["mechanism"] == "dp-sgd" and report["steps"] == 2 and report["sample_rate"] == 0.5
    assert report["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert results[0].privacy["epsilon"] < results[1].privacy["epsilon"] < report["epsilon"]
    private_diff, plain_diff = results[0].global_diff, plain.run_round(start).global_diff
    assert any(not torch.allclose(private_diff[key], plain_diff[key]) for key in private_diff)
    assert all(torch.isfinite(value).all() for value in private_diff.values())


def test_opacus_clips_each_sample_sums_and_divides_by_the_expected_batch():
    """The wiring of DPOptimizer: per-sample gradients of norm 5 and 50 clipped to 1, summed, divided by the
    expected batch size (sample rate x samples), the noise negligible here; an empty batch is a step too."""
    private = PrivateSGD(DPConfig(noise_multiplier=1e-9, max_grad_norm=1.0), num_samples=10, batch_size=2, epochs_per_round=1)
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = private.optimizer(torch.optim.SGD([weight], lr=1.0))
    weight.grad_sample = torch.tensor([[3.0, 4.0], [30.0, 40.0]])
    optimizer.step()
    torch.testing.assert_close(weight.detach(), -torch.tensor([1.2, 1.6]) / 2)
    optimizer.zero_grad(set_to_none=True)
    weight.grad_sample = torch.zeros((0, 2))
    optimizer.step()  # noise only
    assert torch.isfinite(weight).all() and private.history == [(1e-9, 0.2, 2)]


def test_each_private_round_starts_the_optimiser_afresh(tmp_path):
    """An update depends on the received global partition and its own round's steps only."""
    trainer = LocalTrainer(TINY, _private(), make_site(8, seed=3), None, tmp_path)
    for _ in range(2):
        trainer.run_round(trainer.global_state())
    steps = {int(state["step"]) for state in trainer.optimizers["global"].state.values()}
    assert steps == {2}  # this round's 2 steps, not 4


def test_a_target_epsilon_sets_the_noise_so_the_budget_covers_every_round(tmp_path):
    data = make_site(8, seed=3)
    trainer = LocalTrainer(TINY, _private(noise_multiplier=None, target_epsilon=4.0, rounds=3), data, None, tmp_path)
    for _ in range(3):
        report = trainer.run_round(trainer.global_state()).privacy
    assert 3.5 < report["epsilon"] <= 4.0 and report["noise_multiplier"] > 1.0


def test_per_sample_gradients_are_those_of_each_sample_alone():
    model = build_pfedsam(TINY)
    partition = Partition.of(model)
    trained = dict(zip(partition.keys("global"), partition.parameters(model, "global")))
    with torch.no_grad():
        for parameter in trained.values():
            parameter.add_(0.01 * torch.randn_like(parameter))  # B = 0 at the start: give every weight a gradient
    images, masks = torch.rand(3, 3, 64, 64), (torch.rand(3, 1, 64, 64) > 0.7).float()
    loss = SegmentationLoss()

    def sample_loss(forward, sample):
        return loss(forward(images=sample["images"]), sample["masks"])

    with model.global_only():
        grads, losses = per_sample_gradients(model, trained, sample_loss, {"images": images, "masks": masks})
        for index in range(3):
            model.zero_grad()
            one = loss(model(images=images[index : index + 1]), masks[index : index + 1])
            one.backward()
            assert losses[index] == pytest.approx(one.item(), rel=1e-5)
            for name, parameter in trained.items():
                alone = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad  # unused: None
                torch.testing.assert_close(grads[name][index], alone, rtol=1e-4, atol=1e-6)


def test_dp_sgd_refuses_to_distil_the_personalized_model_into_the_global_phase():
    with pytest.raises(ValueError, match="the teacher is trained without DP on every record"):
        TrainerConfig(kd_direction="local_to_global", dp={"noise_multiplier": 1.0})
    assert TrainerConfig(dp={"noise_multiplier": 1.0}).kd_direction == "none"  # the default distils nothing
    assert TrainerConfig(dp={"noise_multiplier": 1.0}, kd_direction="global_to_local").dp.noise_multiplier == 1.0
    assert TrainerConfig(method="fedavg", kd_direction="local_to_global", dp={"noise_multiplier": 1.0}).dp is not None
    with pytest.raises(ValueError, match="kd_direction='local_to_global'"):
        TrainerConfig(method="local", kd_direction="local_to_global", dp={"noise_multiplier": 1.0})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "exactly one of noise_multiplier and target_epsilon"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier must be a finite number above 0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be a finite number above 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "max_grad_norm must be"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta must be in"),
        ({"noise_multiplier": 1.0, "rounds": 0}, "rounds must be a whole number"),
        ({"noise_multiplier": 1.0, "clip": 1.0}, "unknown DP-SGD settings: clip"),
    ],
)
def test_bad_dp_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(kd_direction="none", dp=settings)


def test_the_steps_taken_are_kept_with_the_site_state_and_a_tampered_record_is_refused(tmp_path):
    data = make_site(8, seed=3)
    first = LocalTrainer(TINY, _private(), data, None, tmp_path)
    first.run_round(first.global_state())
    again = LocalTrainer(TINY, _private(), data, None, tmp_path)
    assert again.dp_history == [(1.0, 0.5, 2)]
    assert again.run_round(again.global_state()).privacy["epsilon"] > first.private.epsilon()  # the budget goes on
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    torch.save({**state, "dp_history": [[1.0, 0.5, -50]]}, tmp_path / STATE_FILE)
    with pytest.raises(SiteStateError, match=rf"{STATE_FILE}.*'dp_history'\): release 0 has steps -50"):
        LocalTrainer(TINY, _private(), data, None, tmp_path)
