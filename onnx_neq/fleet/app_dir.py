"""The Flower app project for the deployment engine: `onnx-neq fleet app DIR` writes

DIR/pyproject.toml        a Flower app ([tool.flwr.app]) whose components are onnx-neq's ServerApp and ClientApp
                          and whose run config ([tool.flwr.app.config]) is the fleet's settings
DIR/onnx_neq_fleet.py     the module the components name (it imports them from onnx_neq.fleet.flower_app; every
                          node runs the onnx-neq installed on it)
DIR/.flwr/config.toml     a SuperLink connection "local" (Flower's `flwr run DIR local` reads it with FLWR_HOME=DIR/.flwr)

and the commands that start a SuperLink, SuperNodes and the run. The run config holds only TOML scalars: a
list setting (--classes) is written as "5,6,7" and read back by `fleet_from_run_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx_neq.data.datasets import parse_classes
from onnx_neq.errors import NeqError
from onnx_neq.fleet.config import FleetConfig
from onnx_neq.training.config import settings_of
from onnx_neq.training.files import atomic_write_bytes
from onnx_neq.typed_json import build

MODULE = "onnx_neq_fleet"
MARKER = "written by onnx-neq fleet app"
LINK_PORT = 8000  # the SuperLink's HTTP API (Fleet, Control and Runtime) in Flower 1.4x


@dataclass
class AppCommands:
    superlink: str
    supernode: str  # with {i} for the partition and {port} for the node's own port
    run: str


def fleet_run_config(config: FleetConfig) -> dict[str, Any]:
    """The settings as a Flower run config: TOML scalars, unset ones left out."""
    out = {}
    for s in settings_of(FleetConfig):
        value = getattr(config, s.name)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if value is not None:
            out[s.name] = value
    return out


def fleet_from_run_config(run_config: dict[str, Any]) -> FleetConfig:
    """The FleetConfig of a run config (what a ServerApp's context holds), typed and validated."""
    data = dict(run_config)
    if isinstance(data.get("classes"), str):
        data["classes"] = parse_classes(data["classes"])
    config = build(FleetConfig, data, "the Flower run config", "write the app again with `onnx-neq fleet app`")
    config.validate()
    return config


def fleet_from_json(text: str) -> FleetConfig:
    """The settings a server sends its clients (JSON), typed and validated."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise NeqError("the server's fleet settings are not valid JSON") from None
    return fleet_from_run_config(data)


def write_app(directory: Path, config: FleetConfig, superlink: str = f"127.0.0.1:{LINK_PORT}") -> AppCommands:
    config.validate()
    port_flag = _port_flag(superlink)
    _check_ours(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".flwr").mkdir(exist_ok=True)
    atomic_write_bytes(directory / "pyproject.toml", _pyproject(config).encode())
    atomic_write_bytes(
        directory / f"{MODULE}.py",
        b'"""onnx-neq\'s Flower components (written by onnx-neq fleet app)."""\n\nfrom onnx_neq.fleet.flower_app import client_app, server_app\n\n__all__ = ["client_app", "server_app"]\n',
    )
    link = f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{superlink}"\ninsecure = true\n'
    atomic_write_bytes(directory / ".flwr" / "config.toml", link.encode())
    return AppCommands(
        superlink="flower-superlink --insecure --disable-runtime-dependency-installation" + port_flag,
        supernode=f"flower-supernode --insecure --superlink {superlink} --port {{port}} --node-config 'partition-id={{i}} num-partitions={config.clients}'",
        run=f"FLWR_HOME={directory.resolve()}/.flwr flwr run {directory.resolve()} local --stream",
    )


def _check_ours(directory: Path) -> None:
    """DIR is new, or an app this command wrote (it is rewritten): never someone else's project."""
    for name in ("pyproject.toml", f"{MODULE}.py"):
        path = directory / name
        if path.exists() and (not path.is_file() or MARKER not in path.read_text(errors="replace")):
            raise NeqError(f"{path} exists and was not written by `onnx-neq fleet app`; choose another directory")


def _port_flag(superlink: str) -> str:
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise NeqError(f"--superlink must be HOST:PORT (e.g. 127.0.0.1:{LINK_PORT}), not {superlink!r}")
    return "" if int(port) == LINK_PORT else f" --port {port}"


def _pyproject(config: FleetConfig) -> str:
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "onnx-neq-fleet"',
        'version = "1.0.0"',
        'description = "Budgeted federated fine-tuning with onnx-neq (written by onnx-neq fleet app)"',
        'license = "Apache-2.0"',
        "dependencies = []  # onnx-neq and flwr are installed on every node",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "onnx-neq"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{MODULE}:server_app"',
        f'clientapp = "{MODULE}:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml(value)}" for key, value in fleet_run_config(config).items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string
