"""``GaussianPrivacy`` on real DXOs of the tiny model's global partition, and FLARE's own privacy filters on
the update a real training round produces."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy
from opacus.accountants import RDPAccountant
from sites import make_site

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.flare.privacy import ACCOUNTANT_FILE, GaussianPrivacy, RequireDifferentialPrivacy, l2_norm, read_accountant
from pfedsam_nvflare.flare.settings import METRICS_META_KEY, PRIVACY_META_KEY, model_config_for, reference
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig


@pytest.fixture(scope="module")
def shapes():
    partition = reference(model_config_for({"backbone": "tiny"}, "pfedsam")).partition
    return {key: partition.shapes[key] for key in partition.global_keys}


def _update(shapes, seed=0, norm=50.0):
    rng = np.random.default_rng(seed)
    update = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}
    scale = norm / l2_norm(update)
    return {key: value * scale for key, value in update.items()}


def _send(privacy, data, kind=DataKind.WEIGHT_DIFF):
    shareable = DXO(kind, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 8, METRICS_META_KEY: {"global_dice": 0.5}}).to_shareable()
    return privacy.process(shareable, FLContext())


def _noise(seed, shapes, std):
    rng = np.random.default_rng(seed)
    return {key: rng.normal(0.0, std, shape) for key, shape in shapes.items()}


@pytest.mark.parametrize("norm", [50.0, 0.3])
def test_the_update_is_clipped_before_the_noise(tmp_path, shapes, norm):
    update = _update(shapes, norm=norm)
    privacy = GaussianPrivacy(clip_norm=1.0, noise_multiplier=0.5, max_epsilon=100, accountant_file=str(tmp_path / "a.json"), seed=7)
    sent = from_shareable(_send(privacy, update)).data
    noise = _noise(7, shapes, 0.5)  # the same draws, in the same order
    clipped = {key: sent[key].astype(np.float64) - noise[key] for key in shapes}
    assert l2_norm(clipped) == pytest.approx(min(norm, 1.0), rel=1e-4)
    for key in shapes:  # scaled, not reshaped: the direction is the update's
        np.testing.assert_allclose(clipped[key], update[key] * min(1.0, 1.0 / norm), atol=1e-5)


def test_the_noise_has_the_configured_standard_deviation(tmp_path, shapes):
    update = _update(shapes, norm=3.0)
    privacy = GaussianPrivacy(clip_norm=2.0, noise_multiplier=1.5, accountant_file=str(tmp_path / "a.json"), seed=3)
    sent = from_shareable(_send(privacy, update)).data
    added = np.concatenate([(sent[key].astype(np.float64) - update[key] * (2.0 / 3.0)).ravel() for key in shapes])
    assert added.size > 10_000
    tolerance = 4 * 3.0 / np.sqrt(2 * added.size)  # four standard errors of a sample standard deviation of 3.0
    assert added.std() == pytest.approx(1.5 * 2.0, abs=tolerance)
    assert abs(added.mean()) < 4 * 3.0 / np.sqrt(added.size)


def test_epsilon_equals_opacus_for_the_same_noise_rounds_and_delta(tmp_path, shapes):
    privacy = GaussianPrivacy(noise_multiplier=1.1, delta=1e-5, max_epsilon=100, accountant_file=str(tmp_path / "a.json"))
    accountant = RDPAccountant()
    for release in range(1, 6):
        result = from_shareable(_send(privacy, _update(shapes, seed=release)))
        accountant.step(noise_multiplier=1.1, sample_rate=1.0)
        report = result.get_meta_prop(PRIVACY_META_KEY)
        assert report["releases"] == release
        assert report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
        assert result.get_meta_prop(METRICS_META_KEY) == {"global_dice": 0.5}  # the rest of the meta goes along
        assert result.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 8
    assert report["epsilon"] > 0
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["history"] == [[1.1, 1.0, 5]] and saved["epsilon"] == report["epsilon"]


def test_once_the_budget_is_spent_nothing_leaves(tmp_path, shapes, caplog):
    # ε at δ=1e-5 with noise multiplier 1: 4.73 after one release, 9.01 after three, 10.6 after four
    state = tmp_path / "site_budget.json"
    privacy = GaussianPrivacy(noise_multiplier=1.0, delta=1e-5, max_epsilon=10, accountant_file=str(state))
    for _ in range(3):
        assert _send(privacy, _update(shapes)).get_return_code() == ReturnCode.OK
    blocked = _send(privacy, _update(shapes))
    assert blocked.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    with pytest.raises(ValueError):
        from_shareable(blocked)  # no data at all
    assert "privacy budget is spent: steps counted so far 3" in caplog.text and "max_epsilon=10" in caplog.text
    assert json.loads(state.read_text())["history"] == [[1.0, 1.0, 3]]  # the refused one is not counted
    resumed = GaussianPrivacy(noise_multiplier=1.0, delta=1e-5, max_epsilon=10, accountant_file=str(state))
    assert _send(resumed, _update(shapes)).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR


def test_full_weights_are_refused_and_metrics_pass(tmp_path, shapes, caplog):
    privacy = GaussianPrivacy(accountant_file=str(tmp_path / "a.json"))
    assert _send(privacy, _update(shapes), kind=DataKind.WEIGHTS).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "weights after local training hold the site's update without noise" in caplog.text
    metrics = _send(privacy, {"global_dice": 0.5}, kind=DataKind.METRICS)
    assert from_shareable(metrics).data == {"global_dice": 0.5}
    assert not (tmp_path / "a.json").exists()  # nothing was released, nothing spent


def test_an_update_that_cannot_be_clipped_is_refused(tmp_path, shapes, caplog):
    privacy = GaussianPrivacy(accountant_file=str(tmp_path / "a.json"))
    update = _update(shapes)
    next(iter(update.values()))[0] = np.nan
    assert _send(privacy, update).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "non-finite" in caplog.text


@pytest.mark.parametrize(
    "arguments, named",
    [({"clip_norm": 0}, "clip_norm"), ({"noise_multiplier": -1}, "noise_multiplier"), ({"delta": 1.0}, "delta"),
     ({"max_epsilon": float("inf")}, "max_epsilon")],
)
def test_bad_settings_are_named(arguments, named):
    with pytest.raises(ValueError, match=named):
        GaussianPrivacy(**arguments)


def test_a_state_file_kept_at_another_delta_is_refused(tmp_path, shapes, caplog):
    state = tmp_path / "a.json"
    _send(GaussianPrivacy(delta=1e-5, accountant_file=str(state)), _update(shapes))
    assert _send(GaussianPrivacy(delta=1e-3, accountant_file=str(state)), _update(shapes)).get_return_code() != ReturnCode.OK
    assert "δ=1e-05, not 0.001" in caplog.text


TAMPERED_ACCOUNTANTS = {
    "negative steps": ([[1.0, 1.0, -50]], "release 0 has steps -50, not a whole number ≥ 1"),
    "fractional steps": ([[1.0, 1.0, 2.5]], "release 0 has steps 2.5"),
    "infinite noise": ([[1.0, 1.0, 2], [float("inf"), 1.0, 1]], "release 1 has noise multiplier inf"),
    "no sample rate": ([[1.0, 0.0, 3]], "release 0 has sample rate 0.0, not in (0, 1]"),
}


@pytest.mark.parametrize("fault", list(TAMPERED_ACCOUNTANTS))
def test_a_tampered_accountant_is_refused_naming_the_file(tmp_path, shapes, caplog, fault):
    history, expected = TAMPERED_ACCOUNTANTS[fault]
    state = tmp_path / "budget.json"
    state.write_text(json.dumps({"history": history, "delta": 1e-5}))
    blocked = _send(GaussianPrivacy(noise_multiplier=1.0, delta=1e-5, accountant_file=str(state)), _update(shapes))
    assert blocked.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert f"the accountant's state {state}: {expected}" in caplog.text
    assert json.loads(state.read_text())["history"] == json.loads(json.dumps(history))  # left as it was


def test_an_accountant_that_cannot_be_written_keeps_the_update_and_names_the_file(tmp_path, shapes, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    state = tmp_path / "a-file" / "budget.json"
    blocked = _send(GaussianPrivacy(accountant_file=str(state)), _update(shapes))
    assert blocked.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert f"the accountant's state {state} cannot be kept there" in caplog.text


def test_jobs_releasing_at_once_take_turns_on_the_accountant(tmp_path, shapes):
    state = tmp_path / "budget.json"
    update = _update(shapes)

    def release(count):
        privacy = GaussianPrivacy(noise_multiplier=2.0, max_epsilon=1000, accountant_file=str(state))
        return [_send(privacy, update).get_return_code() for _ in range(count)]

    with ThreadPoolExecutor(4) as pool:
        codes = [code for codes in pool.map(release, [5] * 4) for code in codes]
    assert codes == [ReturnCode.OK] * 20
    assert json.loads(state.read_text())["history"] == [[2.0, 1.0, 20]]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_policy_and_a_job_filter_never_both_noise_and_count_one_update(tmp_path, shapes, caplog):
    caplog.set_level("INFO")
    update = _update(shapes)
    policy = GaussianPrivacy(clip_norm=0.5, noise_multiplier=1.5, max_epsilon=10, accountant_file=str(tmp_path / "site.json"))
    noised = policy.process(DXO(DataKind.WEIGHT_DIFF, update).to_shareable(), FLContext())
    sent = from_shareable(noised).data
    job = GaussianPrivacy(clip_norm=1.0, noise_multiplier=1.0, max_epsilon=10, accountant_file=str(tmp_path / "job.json"))
    passed = job.process(noised, FLContext())
    assert passed.get_return_code() == ReturnCode.OK
    assert all(np.array_equal(from_shareable(passed).data[key], sent[key]) for key in sent)  # not noised twice
    assert not (tmp_path / "job.json").exists()  # nor counted twice
    assert "already noised and counted by an earlier filter" in caplog.text
    stricter = GaussianPrivacy(clip_norm=1.0, noise_multiplier=3.0, accountant_file=str(tmp_path / "job.json"))
    refused = stricter.process(policy.process(DXO(DataKind.WEIGHT_DIFF, update).to_shareable(), FLContext()), FLContext())
    assert refused.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "less privately than this one asks (noise multiplier 1.5 < 3)" in caplog.text


def test_only_noised_updates_and_metrics_leave(tmp_path, shapes, caplog):
    privacy = GaussianPrivacy(accountant_file=str(tmp_path / "a.json"))
    smuggled = _send(privacy, _update(shapes), kind=DataKind.APP_DEFINED)
    assert smuggled.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "it carries DataKind.APP_DEFINED; only DataKind.WEIGHT_DIFF (noised) and DataKind.METRICS leave" in caplog.text
    raw = Shareable()
    raw["weights"] = _update(shapes)
    assert privacy.process(raw, FLContext()).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "it is not a DXO" in caplog.text


def test_privacy_status_shows_each_jobs_releases_and_what_is_left(tmp_path, shapes, capsys):
    privacy = GaussianPrivacy(noise_multiplier=1.0, delta=1e-5, max_epsilon=10, accountant_file=str(tmp_path / ACCOUNTANT_FILE))
    for job in ("job-a", "job-a", "job-b"):
        fl_ctx = FLContext()
        fl_ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
        assert privacy.process(DXO(DataKind.WEIGHT_DIFF, _update(shapes)).to_shareable(), fl_ctx).get_return_code() == ReturnCode.OK
    assert main(["privacy", "status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    spent = accountant.get_epsilon(1e-5)  # 9.01
    assert f"spent ε={spent:.3f} at δ=1e-05 over 3 accountant step(s); budget max_epsilon=10 (as of the last release): {10 - spent:.3f} left" in text
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("job-")}
    assert rows == {"job-a": "2", "job-b": "1"}
    assert main(["privacy", "status", str(tmp_path / "elsewhere")]) == 2


@pytest.fixture(scope="module")
def trained_update(tmp_path_factory):
    data = make_site(4, seed=5)
    trainer = LocalTrainer(ModelConfig(backbone="tiny"), TrainerConfig(batch_size=4), data, None, tmp_path_factory.mktemp("site"))
    result = trainer.run_round(trainer.global_state())
    return {key: value.numpy() for key, value in result.global_diff.items()}


@pytest.mark.parametrize(
    # one round from LoRA's zero-initialised B leaves a fifth of the update exactly 0: a 10th-percentile cut-off of 0
    # would change nothing, so the cut-off is the median
    "heuristic", [PercentilePrivacy(percentile=50, gamma=0.02), SVTPrivacy(fraction=0.1, epsilon=0.2, noise_var=0.1)]
)
def test_flares_heuristic_filters_process_our_update(trained_update, heuristic):
    result = from_shareable(_send(heuristic, trained_update))
    assert sorted(result.data) == sorted(trained_update)
    for key, value in trained_update.items():
        assert result.data[key].shape == value.shape and np.isfinite(result.data[key]).all()
    assert any(not np.array_equal(result.data[key], value) for key, value in trained_update.items())


def _dpsgd_update(shapes, steps=4, **report):
    meta = {PRIVACY_META_KEY: {"mechanism": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": steps,
                               "max_grad_norm": 1.0, "delta": 1e-5, "epsilon": 1.0, **report}}
    return DXO(DataKind.WEIGHT_DIFF, _update(shapes), meta=meta).to_shareable()


def test_a_site_requiring_dp_counts_each_dp_sgd_update_in_its_budget_and_refuses_the_rest(tmp_path, shapes, caplog):
    state = tmp_path / "site.json"
    policy = RequireDifferentialPrivacy(max_epsilon=7.0, accountant_file=str(state))  # ε 4.87, 6.25, then 7.33
    sent = [policy.process(_dpsgd_update(shapes), FLContext()) for _ in range(3)]
    independent = RDPAccountant()
    for _ in range(4):
        independent.step(noise_multiplier=1.0, sample_rate=0.25)
    first = from_shareable(sent[0]).get_meta_prop(PRIVACY_META_KEY)
    assert first["epsilon"] == pytest.approx(independent.get_epsilon(1e-5)) and first["epsilon_training"] == 1.0
    accepted = [reply for reply in sent if reply.get_return_code() == ReturnCode.OK]
    assert len(accepted) == 2 and sent[-1].get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "the privacy budget is spent" in caplog.text
    assert read_accountant(state)["history"] == [(1.0, 0.25, 4 * len(accepted))]  # the refused one is not counted
    plain = policy.process(DXO(DataKind.WEIGHT_DIFF, _update(shapes)).to_shareable(), FLContext())
    assert plain.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "the update was not trained under DP-SGD" in caplog.text
    tampered = policy.process(_dpsgd_update(shapes, steps=-3), FLContext())
    assert tampered.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "its DP-SGD report: release 0 has steps -3" in caplog.text
    metrics = policy.process(DXO(DataKind.METRICS, {"global_dice": 0.5}).to_shareable(), FLContext())
    assert metrics.get_return_code() == ReturnCode.OK


def test_client_level_noise_is_not_stacked_on_a_dp_sgd_update(tmp_path, shapes, caplog):
    privacy = GaussianPrivacy(accountant_file=str(tmp_path / "a.json"))
    assert privacy.process(_dpsgd_update(shapes), FLContext()).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "was trained under DP-SGD" in caplog.text and not (tmp_path / "a.json").exists()
