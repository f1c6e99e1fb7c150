"""A fleet's settings: per-client budgets, a SuperNode's node config, the run config round trip, the messages."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_neq.errors import NeqError
from onnx_neq.fleet.app_dir import fleet_from_json, fleet_from_run_config, fleet_run_config, write_app
from onnx_neq.fleet.config import FleetConfig, client_overrides
from onnx_neq.fleet.updates import ChannelUpdate, check_update

pytestmark = pytest.mark.usefixtures("own_cache")


def _fleet(artifacts, **options) -> FleetConfig:
    return FleetConfig(**{"artifacts": str(artifacts), "data": "digits", "out": "x", "clients": 10, **options})


def test_client_config_gives_clients_their_own_budgets(tiny_artifacts):
    fleet = _fleet(tiny_artifacts, budget_ratio=0.2, client_config="0-4: budget-ratio=0.088; 7: selector=random send=dense")
    assert [fleet.local(c, 1).budget_ratio for c in (0, 4, 5, 7)] == [0.088, 0.088, 0.2, 0.2]
    assert fleet.local(7, 1).selector == "random" and fleet.send_of(7) == "dense" and fleet.send_of(6) == "channels"
    assert fleet.local(3, 2).shard == "3/10/iid/0"
    assert fleet.local(3, 1).seed != fleet.local(3, 2).seed != fleet.local(4, 2).seed  # batch order per client and round


def test_a_node_config_overrides_and_may_hold_all_its_data(tiny_artifacts):
    fleet = _fleet(tiny_artifacts, budget_ratio=0.2)
    node = {"partition-id": 1, "num-partitions": 3, "memory-budget": "64KB", "epochs": 2}
    local = fleet.local(1, 1, node)  # the board's own budget replaces the fleet's, whatever its unit
    assert (local.memory_budget, local.budget_ratio, local.epochs, local.shard) == ("64KB", None, 2, "1/3/iid/0")
    assert fleet.local(0, 1, {"data": "digits@0-4"}).shard is None  # a node without a partition: its own data, whole
    assert fleet.local(0, 1, {"partition-id": 0, "num-partitions": 1}).shard is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0-4 budget-ratio=0.1", "CLIENTS: KEY=VALUE"),
        ("a: budget=10", "I or I-J"),
        ("0: lr=0.1", "KEY one of"),
        ("0: budget=many", "is not a int"),
    ],
)
def test_client_config_errors_name_the_form(text, message):
    with pytest.raises(NeqError, match=message):
        client_overrides(text)


def test_client_config_beyond_the_clients_is_refused(tiny_artifacts):
    with pytest.raises(NeqError, match="names client 12"):
        _fleet(tiny_artifacts, client_config="12: budget=10").validate()


def test_run_config_round_trip(tiny_artifacts, tmp_path):
    fleet = _fleet(tiny_artifacts, classes=[5, 6, 7], budget_ratio=0.088, split="dirichlet:0.5")
    config = fleet_run_config(fleet)
    assert config["classes"] == "5,6,7" and "budget" not in config  # TOML scalars only; unset ones left out
    back = fleet_from_run_config(config)
    assert (back.classes, back.budget_ratio, back.split, back.budget) == ([5, 6, 7], 0.088, "dirichlet:0.5", None)
    with pytest.raises(NeqError, match="run config"):
        fleet_from_run_config({**config, "lr": "fast"})
    with pytest.raises(NeqError, match="not valid JSON"):
        fleet_from_json("{")
    commands = write_app(tmp_path / "app", fleet, "127.0.0.1:8123")
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "onnx_neq_fleet:server_app"' in text and 'split = "dirichlet:0.5"' in text
    assert "127.0.0.1:8123" in (tmp_path / "app" / ".flwr" / "config.toml").read_text() and "num-partitions=10" in commands.supernode
    assert commands.superlink.endswith("--port 8123")
    with pytest.raises(NeqError, match="HOST:PORT"):
        write_app(tmp_path / "app2", fleet, "localhost")
    write_app(tmp_path / "app", fleet)  # its own app: rewritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    with pytest.raises(NeqError, match="not written by"):
        write_app(tmp_path / "mine", fleet)
    assert (tmp_path / "mine" / "pyproject.toml").read_text() == "[project]\nname = 'mine'\n"


def test_messages_round_trip_and_a_malformed_key_is_rejected():
    flower_app = pytest.importorskip("onnx_neq.fleet.flower_app")
    update = ChannelUpdate(7, rows={"w": (np.array([0, 2], np.int32), np.ones((2, 3), np.float32))}, whole={"fc": np.zeros(4, np.float32)})
    back = flower_app.read_update(flower_app.update_record(update), 7)
    state = {"steps": np.array(3), "velocity": np.arange(4.0)}  # a 0-d array stays 0-d (a client's selector state)
    kept = flower_app.params_record(state)
    assert {k: a.numpy().shape for k, a in kept.items()} == {"steps": (), "velocity": (4,)}
    assert back.examples == 7 and back.rows["w"][0].tolist() == [0, 2] and back.whole["fc"].shape == (4,)
    reference = {"w": np.zeros((3, 3), np.float32), "fc": np.zeros(4, np.float32)}
    assert check_update(back, reference) is None
    record = flower_app.update_record(update)
    record["rows/w/extra"] = record["whole/fc"]
    assert "unknown parameter" in check_update(flower_app.read_update(record, 7), reference)
    del record["rows/w/extra"], record["rows/w/values"]
    assert "values must be a float32 array" in check_update(flower_app.read_update(record, 7), reference)
