"""Each setting is declared once (training/config.py): TrainConfig's defaults, the click options of train
and compare, the checks and the names other tables use (selector options, compare's variants) agree."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from onnx_neq.cli import main
from onnx_neq.errors import NeqError
from onnx_neq.results.plan import VARIANTS
from onnx_neq.selection.registry import SELECTORS
from onnx_neq.training.config import BY_NAME, RECIPE, SETTINGS, TRAIN, TrainConfig
from onnx_neq.typed_json import build


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


@pytest.mark.parametrize("command,groups", [("train", (TRAIN, RECIPE)), ("compare", (RECIPE,))])
def test_every_offered_setting_is_an_option_with_the_fields_default(command, groups):
    params = _params(command)
    for s in SETTINGS:
        if s.cli not in groups:
            assert s.name not in params or command == "compare", s.name
            continue
        option = params[s.name]
        assert s.flag in option.opts and option.help, s.name
        expected = s.default if s.default is not None else s.cli_default
        assert option.default == expected, (s.name, option.default, expected)
        if s.choices:
            assert list(option.type.choices) == list(s.choices)


def test_settings_are_the_config_fields_and_only_the_cli_ones_are_options():
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(TrainConfig)]
    offered = {n for n in _params("train") if n in BY_NAME}
    assert offered == {s.name for s in SETTINGS if s.cli}


def test_selector_options_and_variants_name_settings():
    for spec in SELECTORS.values():
        assert set(spec.options) <= set(BY_NAME), spec.name
    assert set(VARIANTS) <= set(BY_NAME)


def test_stored_settings_read_back_as_written():
    config = TrainConfig(artifacts="a", data="digits", out="o", classes=[1, 3], budget_ratio=0.2, memory_pattern=True)
    assert build(TrainConfig, dataclasses.asdict(config), "settings.json", "fix") == config


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lr": 0.0}, "--lr must be a finite number above 0, not 0.0"),
        ({"mu": 2.0}, "--mu must be a number from 0 to 1, not 2.0"),
        ({"eps": float("nan")}, "--eps must be a finite number, not nan"),
        ({"val_fraction": 1.0}, "val_fraction must be a number strictly between 0 and 1"),
        ({"seed": -1}, "--seed must be an integer from 0 to"),
        ({"phi": "round"}, "--phi must be one of spatial, flat, not 'round'"),
        ({"budget": 10, "budget_ratio": 0.2}, "give one of --budget, --budget-ratio, not several"),
        ({"budget": 10, "compute_budget": "1M"}, "--budget is a budget in another unit than --cost compute"),
        ({"memory_pattern": True, "backend": "ort-training"}, "--memory-pattern needs --backend portable or specialized"),
    ],
)
def test_checks_name_the_flag(changes, message):
    with pytest.raises(NeqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(artifacts="a", data="d", out="o", **changes).validate()


def test_settings_honoured_by_some_backends_choose_one_that_honours_all():
    config = TrainConfig(artifacts="a", data="d", out="o", memory_pattern=True, bn_update="selected")
    config.validate()
    assert config.backend == "specialized" and config.backend_options() == {"memory_pattern": True, "bn_update": "selected"}
    portable = TrainConfig(artifacts="a", data="d", out="o", memory_pattern=True)
    portable.validate()
    assert portable.backend == "portable" and portable.backend_options() == {"memory_pattern": True}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["compare", "--out", "x", "--seeds", "0,a"], "--seeds takes comma-separated integers"),
        (["compare", "--out", "x", "--budget-ratios", "0.1,,"], "--budget-ratios takes comma-separated numbers"),
        (["compare", "--out", "x", "--methods", "velocity,nope"], "unknown method 'nope'"),
        (["prepare", "m.onnx", "--input-shape", "1,3,x"], "--input-shape takes comma-separated integers"),
        (["train", "--classes", "4-2"], "the range runs backwards"),
    ],
)
def test_list_options_fail_in_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("onnx-neq: error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "x").exists()
