import pytest
import torch
from sites import make_site

from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import LocalTrainer, NonFiniteTraining, SiteStateError, TrainerConfig, TrainingAborted
from pfedsam_nvflare.training.site_state import PREVIOUS_STATE_FILE, STATE_FILE

TINY = ModelConfig(backbone="tiny")
FAST = TrainerConfig(batch_size=4, lr_global=3e-3, lr_local=3e-3)


def _states(trainer):
    return trainer.model.state_dict()


def _equal(first, second, keys):
    return all(torch.equal(first[key], second[key]) for key in keys)


def _federate(sites, root, rounds, config=FAST, model_config=TINY):
    """A minimal in-process federation: weighted FedAvg of the sites' global differences."""
    trainers = {
        name: LocalTrainer(model_config, config, data, data, root / name, site_name=name) for name, data in sites.items()
    }
    global_state = next(iter(trainers.values())).global_state()
    history = []
    for _ in range(rounds):
        results = {name: trainer.run_round(global_state) for name, trainer in trainers.items()}
        total = sum(result.num_samples for result in results.values())
        global_state = {
            key: value + sum(r.global_diff[key] * r.num_samples for r in results.values()) / total
            for key, value in global_state.items()
        }
        history.append(results)
    return trainers, global_state, history


@pytest.mark.parametrize("kd_direction", ["local_to_global", "global_to_local", "none"])
def test_each_phase_moves_only_its_own_partition(tmp_path, kd_direction):
    data = make_site(6, seed=3)
    trainer = LocalTrainer(TINY, TrainerConfig(kd_direction=kd_direction, global_epochs=0), data, None, tmp_path / "a")
    partition = trainer.partition
    before = {k: v.clone() for k, v in _states(trainer).items()}
    result = trainer.run_round(trainer.global_state())  # local phase only
    after = _states(trainer)
    assert _equal(before, after, partition.global_keys) and _equal(before, after, partition.frozen_keys)
    assert not _equal(before, after, partition.local_keys)
    assert all(p.grad is None for p in partition.parameters(trainer.model, "global"))
    assert all(torch.count_nonzero(diff) == 0 for diff in result.global_diff.values())

    trainer = LocalTrainer(TINY, TrainerConfig(kd_direction=kd_direction, local_epochs=0), data, None, tmp_path / "b")
    before = {k: v.clone() for k, v in _states(trainer).items()}
    result = trainer.run_round(trainer.global_state())  # global phase only
    after = _states(trainer)
    assert _equal(before, after, partition.local_keys) and _equal(before, after, partition.frozen_keys)
    assert not _equal(before, after, partition.global_keys)
    assert all(p.grad is None for p in partition.parameters(trainer.model, "local"))
    assert set(result.global_diff) == set(partition.global_keys)


def test_three_rounds_on_two_sites_lower_the_loss_and_repeat_exactly(tmp_path, two_sites):
    trainers, global_state, history = _federate(two_sites, tmp_path / "run1", rounds=3)
    for name in trainers:
        assert history[-1][name].metrics["global_loss"] < history[0][name].metrics["global_loss"]
        assert history[-1][name].metrics["local_loss"] < history[0][name].metrics["local_loss"]
    fresh = LocalTrainer(TINY, FAST, two_sites["site-1"], two_sites["site-1"], tmp_path / "fresh")
    untrained = fresh.validate()
    trained = trainers["site-1"].validate()
    assert trained["personalized_loss"] < untrained["personalized_loss"]
    assert trained["global_loss"] < untrained["global_loss"]

    again, global_again, _ = _federate(two_sites, tmp_path / "run2", rounds=3)
    assert _equal(global_state, global_again, global_state)
    for name in trainers:
        assert _equal(_states(trainers[name]), _states(again[name]), _states(trainers[name]))


def test_sites_keep_their_own_experts(tmp_path, two_sites):
    trainers, _, _ = _federate(two_sites, tmp_path, rounds=1)
    first, second = (trainer.local_state() for trainer in trainers.values())
    assert not _equal(first, second, first)


def test_a_rebuilt_trainer_resumes_from_the_site_directory(tmp_path):
    data = make_site(6, seed=4)
    trainer = LocalTrainer(TINY, FAST, data, None, tmp_path)
    global_state = trainer.global_state()
    trainer.run_round(global_state)
    resumed = LocalTrainer(TINY, FAST, data, None, tmp_path)
    assert resumed.rounds_done == 1
    assert _equal(trainer.local_state(), resumed.local_state(), trainer.local_state())
    # both continue identically: the optimiser state came back too
    first, second = trainer.run_round(global_state), resumed.run_round(global_state)
    assert first.round == second.round == 2
    assert _equal(first.global_diff, second.global_diff, first.global_diff)
    assert _equal(trainer.local_state(), resumed.local_state(), trainer.local_state())


def test_a_state_file_cut_short_is_a_clear_error(tmp_path):
    data = make_site(4, seed=5)
    LocalTrainer(TINY, FAST, data, None, tmp_path).run_round(LocalTrainer(TINY, FAST, data, None, tmp_path / "x").global_state())
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SiteStateError, match=f"{STATE_FILE} cannot be read .*cut short or corrupted"):
        LocalTrainer(TINY, FAST, data, None, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_state_file_of_another_configuration_is_refused(tmp_path):
    data = make_site(4, seed=5)
    trainer = LocalTrainer(TINY, FAST, data, None, tmp_path)
    trainer.run_round(trainer.global_state())
    with pytest.raises(SiteStateError, match="was written for model"):
        LocalTrainer(ModelConfig(backbone="tiny", num_experts=2), FAST, data, None, tmp_path)


def test_a_received_global_partition_with_nan_is_refused_before_anything_changes(tmp_path):
    data = make_site(4, seed=6)
    trainer = LocalTrainer(TINY, FAST, data, None, tmp_path)
    before = {k: v.clone() for k, v in _states(trainer).items()}
    state = trainer.global_state()
    key = trainer.partition.global_keys[3]
    state[key] = state[key] * float("nan")
    with pytest.raises(ValueError, match=f"global state key '{key}' has non-finite values"):
        trainer.run_round(state)
    assert trainer.rounds_done == 0 and not (tmp_path / STATE_FILE).exists()
    assert _equal(before, _states(trainer), before)


def _after_one_round(site_dir, seed=6):
    data = make_site(4, seed=seed)
    trainer = LocalTrainer(TINY, FAST, data, None, site_dir)
    trainer.run_round(trainer.global_state())
    return data, trainer


def test_a_round_whose_loss_turns_nan_is_rolled_back_and_nothing_is_saved(tmp_path):
    _, trainer = _after_one_round(tmp_path)
    saved = (tmp_path / STATE_FILE).read_bytes()
    before = {k: v.clone() for k, v in _states(trainer).items()}
    healthy = trainer.segmentation_loss
    trainer.segmentation_loss = lambda logits, masks: healthy(logits, masks) * float("nan")
    with pytest.raises(NonFiniteTraining, match=r"round 2 local phase: the loss is nan .*rolled back"):
        trainer.run_round(trainer.global_state())
    assert trainer.rounds_done == 1 and (tmp_path / STATE_FILE).read_bytes() == saved
    assert _equal(before, _states(trainer), before)


def test_the_state_one_round_earlier_stays_beside_the_state(tmp_path):
    data, trainer = _after_one_round(tmp_path)
    first = (tmp_path / STATE_FILE).read_bytes()
    trainer.run_round(trainer.global_state())
    assert (tmp_path / PREVIOUS_STATE_FILE).read_bytes() == first
    (tmp_path / PREVIOUS_STATE_FILE).replace(tmp_path / STATE_FILE)  # undo the second round by hand
    assert LocalTrainer(TINY, FAST, data, None, tmp_path).rounds_done == 1


def _tamper(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _nan_expert(state):
    key = next(iter(state["local"]))
    state["local"][key] = state["local"][key] * float("nan")


def _wrong_moment(state):
    moments = next(iter(state["optimizers"]["local"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, 3)


TAMPERED = {
    "NaN expert": (_nan_expert, r"does not fit this model: local state key .* has non-finite values"),
    "no rounds_done": (lambda state: state.pop("rounds_done"), "is incomplete: it has no 'rounds_done'"),
    "rounds_done text": (lambda state: state.update(rounds_done="abc"), "rounds_done is 'abc', not a number of rounds"),
    "optimiser moment of another shape": (_wrong_moment, "the local optimiser's 'exp_avg' of parameter 0 does not fit"),
}


@pytest.mark.parametrize("fault", list(TAMPERED))
def test_a_tampered_state_file_is_refused_naming_it(tmp_path, fault):
    change, expected = TAMPERED[fault]
    data, _ = _after_one_round(tmp_path, seed=5)
    _tamper(tmp_path / STATE_FILE, change)
    with pytest.raises(SiteStateError, match=f"site state {tmp_path / STATE_FILE} .*{expected}"):
        LocalTrainer(TINY, FAST, data, None, tmp_path)


def test_received_global_state_is_checked_strictly(tmp_path):
    data = make_site(4, seed=6)
    trainer = LocalTrainer(TINY, FAST, data, None, tmp_path)
    state = trainer.global_state()
    state[trainer.partition.local_keys[0]] = trainer.local_state()[trainer.partition.local_keys[0]]
    with pytest.raises(ValueError, match="a local-partition key"):
        trainer.run_round(state)
    assert trainer.rounds_done == 0


def test_abort_between_batches_keeps_nothing_of_the_round(tmp_path):
    data = make_site(8, seed=7)
    trainer = LocalTrainer(TINY, TrainerConfig(batch_size=2), data, None, tmp_path)
    before = {k: v.clone() for k, v in _states(trainer).items()}
    calls = []

    def abort_on_third_batch():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(TrainingAborted):
        trainer.run_round(trainer.global_state(), should_abort=abort_on_third_batch)
    assert len(calls) == 3
    assert _equal(before, _states(trainer), before)
    assert trainer.rounds_done == 0 and not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("method", ["fedavg", "fedsam", "local"])
def test_the_baselines_train(tmp_path, method):
    data = make_site(4, seed=8)
    trainer = LocalTrainer(TINY, TrainerConfig(method=method), data, data, tmp_path)
    received = trainer.global_state()
    result = trainer.run_round(received)
    assert ("local_loss" in result.metrics) == (method == "local")
    assert torch.isfinite(torch.tensor(result.metrics["global_loss"]))
    if method == "fedsam":  # every SAM weight is shared
        assert len(result.global_diff) == len(list(trainer.model.sam.parameters()))
    if method == "local":  # the site ignores the server after its first round
        ignored = {key: torch.zeros_like(value) for key, value in received.items()}
        before = trainer.global_state()
        trainer.run_round(ignored)
        assert not _equal(before, trainer.global_state(), before)
        assert all(torch.count_nonzero(value) > 0 for value in trainer.global_state().values() if value.numel() > 1)
    metrics = trainer.validate()
    assert {"personalized_dice", "personalized_hd95", "global_dice", "global_hd95"} <= set(metrics)


def test_bad_samples_are_named(tmp_path):
    data = make_site(3, seed=9)
    data[1] = (data[1][0], data[1][1] * 2)
    with pytest.raises(ValueError, match="training sample 1: mask values must be 0 or 1"):
        LocalTrainer(TINY, FAST, data, None, tmp_path)
    with pytest.raises(ValueError, match="validation sample 0: image of shape \\(1, 32, 32\\)"):
        LocalTrainer(TINY, FAST, data[:1], [(torch.rand(1, 32, 32), torch.zeros(1, 32, 32))], tmp_path)
    with pytest.raises(ValueError, match="training sample 0: image values must be finite and within"):
        LocalTrainer(TINY, FAST, [(data[0][0] + 2, data[0][1])], None, tmp_path)
    with pytest.raises(ValueError, match="the training set is empty"):
        LocalTrainer(TINY, FAST, [], None, tmp_path)


def _steps(trainer):
    """Optimiser steps taken so far, per optimiser (AdamW counts them per parameter)."""
    return {name: int(next(iter(o.state_dict()["state"].values()), {"step": 0})["step"]) for name, o in trainer.optimizers.items()}


@pytest.mark.parametrize("method", ["pfedsam", "fedavg", "ditto", "fedsam"])
def test_every_method_makes_the_same_number_of_optimiser_steps_per_round(tmp_path, method):
    data = make_site(6, seed=10)  # two batches of four per epoch
    trainer = LocalTrainer(TINY, TrainerConfig(method=method, batch_size=4), data, None, tmp_path)
    trainer.run_round(trainer.global_state())
    assert sum(_steps(trainer).values()) == 4  # local + global epochs, one each: 2 batches x 2 epochs


def test_ditto_keeps_a_personal_copy_pulled_toward_the_global_partition(tmp_path):
    data = make_site(6, seed=11)
    config = TrainerConfig(method="ditto", batch_size=3, lr_local=1e-2)
    trainer = LocalTrainer(TINY, config, data, data, tmp_path)
    received = trainer.global_state()
    result = trainer.run_round(received)
    assert trainer.model.has_experts is False and set(result.global_diff) == set(trainer.partition.global_keys)
    personal = trainer.personal
    assert personal is not None and not _equal(personal, trainer.global_state(), personal)
    resumed = LocalTrainer(TINY, config, data, data, tmp_path)
    assert _equal(resumed.personal, personal, personal)  # kept in the site state
    metrics = trainer.validate()
    assert metrics["personalized_loss"] != metrics["global_loss"]  # the personal copy is what "personalized" runs
    # a strong proximal term keeps the personal copy near the global partition
    near = LocalTrainer(TINY, TrainerConfig(method="ditto", batch_size=3, lr_local=1e-2, ditto_lambda=1e4), data, data, tmp_path / "near")
    near.run_round(received)
    distance = lambda state: sum(float(((state[k] - received[k]) ** 2).sum()) for k in received)  # noqa: E731
    assert distance(near.personal) < distance(personal)


def test_global_first_phase_order_trains_the_experts_on_the_sites_new_global_partition(tmp_path):
    data = make_site(4, seed=12)
    first = LocalTrainer(TINY, TrainerConfig(phase_order="global_first", kd_direction="none"), data, None, tmp_path / "a")
    second = LocalTrainer(TINY, TrainerConfig(phase_order="local_first", kd_direction="none"), data, None, tmp_path / "b")
    received = first.global_state()
    diff_first, diff_second = first.run_round(received).global_diff, second.run_round(received).global_diff
    # without distillation the global phase runs on the global-only path: the same in either order; the experts
    # learn on the received global partition in one order and on the site's updated one in the other
    assert all(torch.allclose(diff_first[k], diff_second[k], atol=1e-6) for k in diff_first)
    assert not _equal(first.local_state(), second.local_state(), first.local_state())


def test_personalize_refits_the_experts_to_a_global_partition_and_changes_nothing_else(tmp_path):
    data = make_site(4, seed=13)
    trainer = LocalTrainer(TINY, FAST, data, data, tmp_path)
    trainer.run_round(trainer.global_state())
    state_file = (tmp_path / STATE_FILE).read_bytes()
    before = {k: v.clone() for k, v in _states(trainer).items()}
    final = {k: v * 1.01 for k, v in trainer.global_state().items()}
    kept = trainer.personalize(final)
    assert _equal(before, _states(trainer), before) and (tmp_path / STATE_FILE).read_bytes() == state_file
    assert _equal(kept.global_state, final, final) and kept.rounds_done == 1
    assert not _equal(kept.local_state, trainer.local_state(), kept.local_state)


def test_the_global_to_local_teacher_is_the_received_model_in_either_phase_order(tmp_path, monkeypatch):
    data = make_site(4, seed=14)
    seen = []
    original = LocalTrainer._teacher

    def recording(self, personalized, weights):
        seen.append((personalized, {key: value.clone() for key, value in weights.items()}))
        return original(self, personalized, weights)

    monkeypatch.setattr(LocalTrainer, "_teacher", recording)
    for order in ("local_first", "global_first"):
        trainer = LocalTrainer(TINY, TrainerConfig(kd_direction="global_to_local", phase_order=order), data, None, tmp_path / order)
        received = trainer.global_state()
        seen.clear()
        trainer.run_round(received)
        assert len(seen) == 1 and seen[0][0] is False and _equal(seen[0][1], received, received), order


def test_the_device_is_the_gpu_where_there_is_one(monkeypatch):
    from pfedsam_nvflare.training.compute import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda"):
        TrainerConfig(device="gpu")


def test_auto_precision_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    from pfedsam_nvflare.training.compute import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    assert resolve_precision("float32", cpu) == torch.float32
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16"):
        TrainerConfig(precision="float16")


def test_a_prefix_computed_in_another_precision_is_cached_apart(tmp_path):
    data = make_site(2, seed=0)
    folders = {
        precision: LocalTrainer(TINY, TrainerConfig(precision=precision), data, None, tmp_path).train_samples.cache.folder
        for precision in ("float32", "bfloat16")
    }
    assert folders["float32"] != folders["bfloat16"]
    assert all(len(list(folder.rglob("*.pt"))) == 2 for folder in folders.values())
