"""Unit tests of the FLARE components in NVFlare's own style: real DXOs, Shareables and FLContexts."""

import json
from argparse import Namespace

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from pfedsam_nvflare.flare.aggregator import GlobalPartitionAggregator
from pfedsam_nvflare.flare.filters import GlobalPartitionFilter
from pfedsam_nvflare.flare.metrics_writer import RoundMetricsWriter
from pfedsam_nvflare.flare.settings import METRICS_META_KEY, model_config_for, reference
from pfedsam_nvflare.flare.threads import set_thread_budget, sites_on_this_machine

MODEL = {"backbone": "tiny"}


@pytest.fixture(scope="module")
def partition():
    return reference(model_config_for(MODEL, "pfedsam")).partition


def _context(current_round=1):
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, current_round, private=True, sticky=False)
    return fl_ctx


def _diff(partition, fill):
    return {key: np.full(partition.shapes[key], fill, dtype=np.float32) for key in partition.global_keys}


def _contribution(data, site="site-1", weight=10, kind=DataKind.WEIGHT_DIFF, contribution_round=1):
    shareable = DXO(kind, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, contribution_round)
    return shareable


def test_weighted_average_matches_a_hand_computed_value(partition):
    aggregator = GlobalPartitionAggregator(model=MODEL)
    fl_ctx = _context()
    assert aggregator.accept(_contribution(_diff(partition, 1.0), "site-1", weight=10), fl_ctx)
    assert aggregator.accept(_contribution(_diff(partition, 4.0), "site-2", weight=30), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert result.data_kind == DataKind.WEIGHT_DIFF
    assert sorted(result.data) == sorted(partition.global_keys)
    for value in result.data.values():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, (10 * 1.0 + 30 * 4.0) / 40)  # 3.25
    assert result.get_meta_prop("contributors") == ["site-1", "site-2"]


def test_after_aggregation_a_new_round_starts_empty(partition):
    aggregator = GlobalPartitionAggregator(model=MODEL)
    aggregator.accept(_contribution(_diff(partition, 2.0)), _context())
    aggregator.aggregate(_context())
    assert aggregator.accept(_contribution(_diff(partition, 1.0), contribution_round=2), _context(2))
    result = from_shareable(aggregator.aggregate(_context(2)))
    np.testing.assert_allclose(next(iter(result.data.values())), 1.0)


def _foreign(partition):
    data = _diff(partition, 1.0)
    data[partition.local_keys[0]] = np.zeros(partition.shapes[partition.local_keys[0]], np.float32)
    return data


def _missing(partition):
    data = _diff(partition, 1.0)
    del data[partition.global_keys[0]]
    return data


def _misshaped(partition):
    data = _diff(partition, 1.0)
    data[partition.global_keys[0]] = np.zeros((2, 2), np.float32)
    return data


def _non_finite(partition):
    data = _diff(partition, 1.0)
    data[partition.global_keys[1]] = data[partition.global_keys[1]] * np.nan
    return data


REJECTIONS = {
    "foreign key": (lambda p: _contribution(_foreign(p)), "a local-partition key"),
    "missing key": (lambda p: _contribution(_missing(p)), "is missing key"),
    "wrong shape": (lambda p: _contribution(_misshaped(p)), "has shape (2, 2)"),
    "non-finite": (lambda p: _contribution(_non_finite(p)), "non-finite values"),
    "wrong data kind": (lambda p: _contribution(_diff(p, 1.0), kind=DataKind.WEIGHTS), "data kind is DataKind.WEIGHTS, expected DataKind.WEIGHT_DIFF"),
    "stale round": (lambda p: _contribution(_diff(p, 1.0), contribution_round=0), "it is for round 0, the current round is 1"),
    "no weight": (lambda p: _contribution(_diff(p, 1.0), weight=0), "is not a number of training samples"),
    "infinite weight": (lambda p: _contribution(_diff(p, 1.0), weight=float("inf")), "weight NUM_STEPS_CURRENT_ROUND=inf"),
    "NaN weight": (lambda p: _contribution(_diff(p, 1.0), weight=float("nan")), "weight NUM_STEPS_CURRENT_ROUND=nan"),
    "absurd weight": (lambda p: _contribution(_diff(p, 1.0), weight=1e308), "at most 1e+09"),
    "beyond float32": (lambda p: _contribution(_diff(p, 0.0) | {p.global_keys[2]: np.full(p.shapes[p.global_keys[2]], 1e300)}), "beyond float32's range"),
    "integer arrays": (lambda p: _contribution({k: v.astype(np.int64) for k, v in _diff(p, 1.0).items()}), "not a floating-point array"),
}


@pytest.mark.parametrize("reason", list(REJECTIONS))
def test_a_bad_contribution_is_rejected_with_its_reason_and_the_round_goes_on(partition, reason, caplog):
    make, expected = REJECTIONS[reason]
    aggregator = GlobalPartitionAggregator(model=MODEL)
    fl_ctx = _context()
    assert aggregator.accept(_contribution(_diff(partition, 2.0), "site-1"), fl_ctx)
    with caplog.at_level("ERROR"):
        bad = make(partition)
        bad.set_peer_props({ReservedKey.IDENTITY_NAME: "site-2"})
        assert not aggregator.accept(bad, fl_ctx)
    assert any("rejected the contribution of site-2" in r.message and expected in r.message for r in caplog.records)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    np.testing.assert_allclose(result.data[partition.global_keys[0]], 2.0)  # only site-1 counted
    assert result.get_meta_prop("contributors") == ["site-1"]


def test_a_second_contribution_of_a_site_in_a_round_is_rejected(partition, caplog):
    aggregator = GlobalPartitionAggregator(model=MODEL)
    fl_ctx = _context()
    assert aggregator.accept(_contribution(_diff(partition, 1.0)), fl_ctx)
    with caplog.at_level("ERROR"):
        assert not aggregator.accept(_contribution(_diff(partition, 9.0)), fl_ctx)
    assert any("already contributed" in r.message for r in caplog.records)


def test_weights_that_would_overflow_the_sum_never_reach_the_average(partition, caplog):
    """Two weights of 1e308 overflowed the sum and made the average NaN; they are refused, and the average of what
    was accepted is finite."""
    aggregator = GlobalPartitionAggregator(model=MODEL)
    fl_ctx = _context()
    assert aggregator.accept(_contribution(_diff(partition, 1.0), "site-1", weight=12), fl_ctx)
    with caplog.at_level("ERROR"):
        for site in ("site-2", "site-3"):
            assert not aggregator.accept(_contribution(_diff(partition, 3e38), site, weight=1e308), fl_ctx)
    result = from_shareable(aggregator.aggregate(fl_ctx))
    assert all(np.isfinite(value).all() for value in result.data.values())
    assert result.get_meta_prop("contributors") == ["site-1"]


def test_a_round_without_accepted_contributions_leaves_the_model_as_it_is(partition):
    aggregator = GlobalPartitionAggregator(model=MODEL)
    result = from_shareable(aggregator.aggregate(_context()))
    assert result.data_kind == DataKind.WEIGHT_DIFF and result.data == {}


def test_an_average_that_is_not_finite_never_leaves_the_server(partition, caplog):
    """The contribution checks keep the average finite; should a sum overflow all the same, it is not sent."""
    aggregator = GlobalPartitionAggregator(model=MODEL)
    assert aggregator.accept(_contribution(_diff(partition, 1.0), "site-1"), _context())
    key = partition.global_keys[0]
    aggregator._sums[key] = np.full(partition.shapes[key], 1e300)  # beyond float32 once averaged
    with caplog.at_level("ERROR"):
        result = from_shareable(aggregator.aggregate(_context()))
    assert result.data == {} and result.get_meta_prop("contributors") == []
    assert f"the average of key {key!r} is not finite in float32" in caplog.text


def test_the_server_writes_no_global_partition_that_is_not_finite_or_does_not_fit(partition, tmp_path):
    from nvflare.app_common.abstract.model import make_model_learnable

    from pfedsam_nvflare.flare.persistor import GlobalPartitionPersistor

    persistor = GlobalPartitionPersistor(model=MODEL)
    persistor._folder = tmp_path  # what START_RUN sets
    state = reference(model_config_for(MODEL, "pfedsam")).initial_global
    key = partition.global_keys[0]
    for bad, why in (({**state, key: state[key] * float("nan")}, "non-finite"), ({**state, "extra": state[key]}, "unexpected key 'extra'")):
        with pytest.raises(ValueError, match=why):
            persistor.save_model(make_model_learnable({k: v.numpy() for k, v in bad.items()}, {}), _context())
        assert list(tmp_path.iterdir()) == []
    persistor.save_model(make_model_learnable({k: v.numpy() for k, v in state.items()}, {}), _context(current_round=2))
    assert torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["rounds_done"] == 3


def test_the_filter_drops_non_global_keys_and_logs_only_their_names(partition, caplog):
    data = _diff(partition, 1.0)
    secret_key = partition.local_keys[0]
    data[secret_key] = np.full(partition.shapes[secret_key], 123.456, np.float32)
    data["sam.image_encoder.blocks.0.attn.qkv.base.weight"] = np.zeros((3,), np.float32)
    shareable = _contribution(data)
    with caplog.at_level("WARNING"):
        filtered = GlobalPartitionFilter(model=MODEL).process(shareable, _context())
    result = from_shareable(filtered)
    assert sorted(result.data) == sorted(partition.global_keys)
    assert result.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 10
    logged = " ".join(r.message for r in caplog.records)
    assert "dropped 2 keys" in logged and secret_key in logged and "123.45" not in logged


def test_the_filter_leaves_a_clean_update_untouched(partition):
    data = _diff(partition, 1.0)
    filtered = from_shareable(GlobalPartitionFilter(model=MODEL).process(_contribution(data), _context()))
    assert sorted(filtered.data) == sorted(partition.global_keys)
    assert "GlobalPartitionFilter" not in (filtered.get_filter_history() or [])


def test_the_filter_lets_validation_metrics_through(partition):
    metrics = DXO(DataKind.METRICS, {"personalized_dice": 0.8, "global_dice": 0.6}).to_shareable()
    result = from_shareable(GlobalPartitionFilter(model=MODEL).process(metrics, _context()))
    assert result.data_kind == DataKind.METRICS and result.data == {"personalized_dice": 0.8, "global_dice": 0.6}


class _Workspace:
    def __init__(self, root):
        self.root = root

    def get_root_dir(self):
        return str(self.root)


class _Engine:
    def __init__(self, root):
        self.workspace = _Workspace(root)

    def get_workspace(self):
        return self.workspace


@pytest.mark.parametrize(("threads", "clients", "expected"), [(3, "site-1,site-2,site-3", 3), (2, "a,b,c,d", 2), (4, "a,b", 2)])
def test_simulated_sites_share_the_machine_as_the_simulator_runs_them(threads, clients, expected):
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SIMULATE_MODE, True, private=True, sticky=True)
    fl_ctx.set_prop(FLContextKey.ARGS, Namespace(threads=threads, clients=clients), private=True, sticky=True)
    assert sites_on_this_machine(fl_ctx) == expected


def test_a_poc_site_counts_the_client_kits_beside_it_and_a_lone_site_has_the_machine(tmp_path):
    for name in ("site-1", "site-2", "server"):
        (tmp_path / "poc" / name / "startup").mkdir(parents=True)
    for name in ("site-1", "site-2"):
        (tmp_path / "poc" / name / "startup" / "fed_client.json").write_text("{}")
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, _Engine(tmp_path / "poc" / "site-1"), private=True, sticky=True)
    assert sites_on_this_machine(fl_ctx) == 2
    (tmp_path / "alone" / "startup").mkdir(parents=True)
    fl_ctx.set_prop(ReservedKey.ENGINE, _Engine(tmp_path / "alone"), private=True, sticky=True)
    assert sites_on_this_machine(fl_ctx) == 1


def test_the_user_thread_setting_wins(monkeypatch):
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.SIMULATE_MODE, True, private=True, sticky=True)
    fl_ctx.set_prop(FLContextKey.ARGS, Namespace(threads=64, clients=",".join(f"s{i}" for i in range(64))), private=True, sticky=True)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_thread_budget(fl_ctx) == (before, "OMP_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        threads, reason = set_thread_budget(fl_ctx)
        assert threads == 1 and "shared by 64 site(s)" in reason
    finally:
        torch.set_num_threads(before)


def test_a_site_configures_once_where_its_state_outlives_jobs(tmp_path, monkeypatch):
    from pfedsam_nvflare.flare.site_storage import STATE_DIR_ENV, configured_state_dir, write_site_config

    local = tmp_path / "kit" / "local"
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    folder, why = configured_state_dir(local, "site-1")
    assert folder is None and "pfedsam_site.json" in why
    config = write_site_config(local, tmp_path / "state")
    assert configured_state_dir(local, "site-1") == ((tmp_path / "state" / "site-1").resolve(), str(config))
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "env"))  # the environment wins, as OMP_NUM_THREADS does
    assert configured_state_dir(local, "site-1")[0] == tmp_path / "env" / "site-1"
    monkeypatch.delenv(STATE_DIR_ENV)
    config.write_text('{"state": "/x"}')
    with pytest.raises(ValueError, match="pfedsam_site.json: expected"):
        configured_state_dir(local, "site-1")


def test_a_job_continues_only_a_global_partition_saved_for_its_own_settings(tmp_path):
    from pfedsam_nvflare.flare.persistor import GlobalPartitionPersistor

    config = model_config_for(MODEL, "pfedsam")
    state = {key: value + 0.5 for key, value in reference(config).initial_global.items()}
    saved = tmp_path / "FL_global_model.pt"
    torch.save({"global": state, "model": config.to_dict(), "method": "pfedsam"}, saved)
    loaded = GlobalPartitionPersistor(model=MODEL, initial_global=str(saved))._continued()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    other = GlobalPartitionPersistor(model={**MODEL, "lora_rank": 2}, initial_global=str(saved))
    with pytest.raises(ValueError, match=r"FL_global_model.pt was saved by a 'pfedsam' job with other model settings \(lora_rank differ\)"):
        other._continued()
    key = next(iter(state))
    torch.save({"global": {**state, key: state[key] * float("nan")}, "model": config.to_dict(), "method": "pfedsam"}, saved)
    with pytest.raises(ValueError, match=f"FL_global_model.pt: global state key '{key}' has non-finite values"):
        GlobalPartitionPersistor(model=MODEL, initial_global=str(saved))._continued()
    torch.save({"global": state, "model": config.to_dict(), "method": "pfedsam", "rounds_done": -3}, saved)
    with pytest.raises(ValueError, match="FL_global_model.pt: 'rounds_done' is -3, not a count of rounds"):
        GlobalPartitionPersistor(model=MODEL, initial_global=str(saved))._continued()
    saved.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="FL_global_model.pt cannot be read"):
        GlobalPartitionPersistor(model=MODEL, initial_global=str(saved))._continued()


def _after_accept(writer, shareable, accepted):
    fl_ctx = _context()
    fl_ctx.set_prop(AppConstants.TRAINING_RESULT, shareable, private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
    writer.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, fl_ctx)


def test_the_metrics_record_only_accepted_contributions_and_small_flat_metrics(partition, tmp_path, caplog):
    writer = RoundMetricsWriter()
    writer._path, writer._record = tmp_path / "metrics.json", {"rounds": [], "dropped": {}, "final": {}}  # what START_RUN sets
    writer.handle_event(AppEventType.ROUND_STARTED, _context())
    good = _contribution(_diff(partition, 1.0), "site-1")
    good_dxo = from_shareable(good)
    good_dxo.set_meta_prop(METRICS_META_KEY, {"round": 0, "global_dice": 0.5})
    _after_accept(writer, good_dxo.update_shareable(good), accepted=True)
    late = _contribution(_diff(partition, 1.0), "site-2", contribution_round=0)
    late_dxo = from_shareable(late)
    late_dxo.set_meta_prop(METRICS_META_KEY, {"round": -1, "global_dice": 0.9})
    _after_accept(writer, late_dxo.update_shareable(late), accepted=False)
    huge = _contribution(_diff(partition, 1.0), "site-3")
    huge_dxo = from_shareable(huge)
    huge_dxo.set_meta_prop(METRICS_META_KEY, {f"m{i}": 1.0 for i in range(10_000)})
    with caplog.at_level("WARNING"):
        _after_accept(writer, huge_dxo.update_shareable(huge), accepted=True)
    writer.handle_event(AppEventType.AFTER_AGGREGATION, _context())
    (entry,) = writer._record["rounds"]
    assert entry["sites"] == {"site-1": {"round": 0, "global_dice": 0.5}}  # the late one is not recorded
    assert entry["rejected"] == ["site-2"] and set(entry["updates"]) == {"site-1", "site-3"}
    assert "left out the metrics of site-3: 10000 entries, more than 64" in caplog.text


def test_a_site_refuses_a_global_partition_and_a_filter_a_result_made_for_other_model_settings(partition, caplog):
    from nvflare.apis.fl_constant import ReturnCode

    from pfedsam_nvflare.flare.executor import PFedSAMExecutor
    from pfedsam_nvflare.flare.settings import MODEL_META_KEY, job_model

    other = job_model({**MODEL, "lora_rank": 2})
    task = DXO(DataKind.WEIGHTS, _diff(partition, 0.0), meta={MODEL_META_KEY: other}).to_shareable()
    with caplog.at_level("ERROR"):
        assert PFedSAMExecutor(model=MODEL)._received_global(task, _context()) is None
    assert "lora_rank: 4 in this site's executor, 2 in the server's global partition" in caplog.text
    fl_ctx = _context()
    fl_ctx.set_prop(MODEL_META_KEY, other, private=False, sticky=False)
    result = GlobalPartitionFilter(model=MODEL).process(_contribution(_diff(partition, 1.0)), fl_ctx)
    assert result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "lora_rank: 4 in GlobalPartitionFilter, 2 in the site's executor" in caplog.text


def test_the_metrics_name_a_site_that_stops_sending_and_the_round_it_dropped(tmp_path, caplog):
    writer = RoundMetricsWriter()
    writer._path, writer._record = tmp_path / "metrics.json", {"rounds": [], "dropped": {}, "final": {}}
    for current_round, contributors in enumerate([["site-1", "site-2", "site-3"], ["site-1", "site-3"], ["site-1"]]):
        started = _context(current_round)
        writer.handle_event(AppEventType.ROUND_STARTED, started)
        aggregated = DXO(DataKind.WEIGHT_DIFF, {}, meta={"contributors": contributors}).to_shareable()
        finished = _context(current_round)
        finished.set_prop(AppConstants.AGGREGATION_RESULT, aggregated, private=True, sticky=False)
        with caplog.at_level("WARNING"):
            writer.handle_event(AppEventType.AFTER_AGGREGATION, finished)
    assert [entry["missing"] for entry in writer._record["rounds"]] == [[], ["site-2"], ["site-2", "site-3"]]
    assert {site: entry["round"] for site, entry in writer._record["dropped"].items()} == {"site-2": 1, "site-3": 2}
    assert "site-2 sent no update in round 1" in caplog.text and "site-3 sent no update in round 2" in caplog.text
    assert json.loads((tmp_path / "metrics.json").read_text())["dropped"]["site-3"]["round"] == 2


@pytest.mark.parametrize(
    "method, given, expected",
    [("pfedsam", None, "none"), ("pfedsam", "global_to_local", "global_to_local"),
     ("pfedsam_kd", None, "local_to_global"), ("pfedsam_kd", "none", "local_to_global")],
)
def test_a_method_preset_fixes_the_distillation_and_pfedsam_keeps_the_trainers(method, given, expected):
    from pfedsam_nvflare.flare.recipe import PFedSAMRecipe
    from pfedsam_nvflare.training import TrainerConfig

    trainer = TrainerConfig(kd_direction=given) if given else None
    recipe = PFedSAMRecipe(method=method, model=None, trainer=trainer)
    assert (recipe.trainer.method, recipe.trainer.kd_direction) == ("pfedsam", expected)


@pytest.mark.parametrize("method, given", [("pfedsam_nokd", "local_to_global"), ("pfedsam_kd", "global_to_local")])
def test_a_trainer_that_contradicts_the_methods_distillation_is_refused(method, given):
    from pfedsam_nvflare.flare.recipe import PFedSAMRecipe
    from pfedsam_nvflare.training import TrainerConfig

    with pytest.raises(ValueError, match=f"method {method} always runs kd_direction=.*asks for '{given}'"):
        PFedSAMRecipe(method=method, model=None, trainer=TrainerConfig(kd_direction=given))
