"""A fleet's settings: train's (TrainConfig: the local recipe every client runs each round) and its own.

Per-client settings (`--client-config`, or a SuperNode's --node-config) override train's for some clients:
    "0-4: budget-ratio=0.088; 5-9: budget-ratio=0.308"
gives clients 0..4 an 8.8% and clients 5..9 a 30.8% budget (any of CLIENT_KEYS; `I` alone is one client). A
SuperNode's node config takes the same keys (with `-` or `_`), plus `data` and `artifacts` (where this board
holds them) and `partition-id` / `num-partitions` (Flower's names: this node's part of the split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnx_neq.backends.base import ORT_TRAINING, PORTABLE, SPECIALIZED
from onnx_neq.data.shards import IID, Shard, parse_split
from onnx_neq.errors import NeqError
from onnx_neq.fleet.updates import CHANNELS, SENDS
from onnx_neq.training.config import RECIPE, TrainConfig, setting, settings_of

FLEET = "fleet"  # `fleet` commands only (a FleetConfig setting)
CLIENT_KEYS = ("budget", "budget_ratio", "memory_budget", "compute_budget", "selector", "backend", "send", "epochs", "batch_size")
NODE_KEYS = ("data", "artifacts")
BUDGET_KEYS = {"budget", "budget_ratio", "memory_budget", "compute_budget"}


@dataclass
class FleetConfig(TrainConfig):
    epochs: int = setting(1, "Local epochs per client and round (each round's learning-rate schedule).", cli=RECIPE, minimum=1)
    warmup_epochs: int = setting(0, "Epochs of linear learning-rate warm-up in each round (at most --epochs - 1).", cli=RECIPE, minimum=0)
    clients: int = setting(10, "Clients (simulated SuperNodes) the training split is shared among.", cli=FLEET, minimum=1)
    rounds: int = setting(5, "Federated rounds.", cli=FLEET, minimum=1)
    split: str = setting(
        IID, "How the training split is shared: iid, or dirichlet:ALPHA (a label split; small ALPHA: few classes each).", cli=FLEET
    )
    send: str = setting(
        CHANNELS,
        "What a client sends: the rows of the channels it trained, or every trainable parameter (FedAvg).",
        cli=FLEET,
        choices=SENDS,
    )
    min_clients: int | None = setting(
        None, "Clients a round needs (Flower's minimum available and trained nodes) [default: all of --clients].", cli=FLEET, minimum=1
    )
    round_timeout: float = setting(
        3600.0, "Seconds the server waits for a round's replies; a client later than that is left out.", cli=FLEET, above=0
    )
    client_config: str = setting("", "Per-client settings, e.g. '0-4: budget-ratio=0.088; 5-9: budget-ratio=0.308'.", cli=FLEET)

    def validate(self) -> None:
        super().validate()
        parse_split(self.split)
        for clients, _ in client_overrides(self.client_config):
            if clients and max(clients) >= self.clients:
                raise NeqError(f"--client-config names client {max(clients)}, but there are {self.clients} (0..{self.clients - 1})")
        if self.min_clients is not None and self.min_clients > self.clients:
            raise NeqError(f"--min-clients {self.min_clients} is more than --clients {self.clients}")

    def local(self, client: int, round_: int, node: dict[str, Any] | None = None) -> TrainConfig:
        """The run client `client` trains in round `round_` (from 1): train's settings with the client's own,
        on its shard, with a seed of its own per round (batch order and draws; the split stays the fleet's)."""
        node = node or {}
        values = {s.name: getattr(self, s.name) for s in settings_of(TrainConfig)}
        for clients, overrides in client_overrides(self.client_config):
            if client in clients:
                _override(values, overrides)
        _override(values, node_overrides(node))
        values.pop("send", None)
        clients = int(node.get("num-partitions", self.clients)) if not node or "partition-id" in node else 1  # else: all its data
        values["shard"] = str(Shard(client, clients, self.split, self.seed)) if clients > 1 else None
        values["seed"] = self.seed * 1_000_003 + round_ * 1009 + client
        if values["backend"] == ORT_TRAINING:
            raise NeqError(f"a fleet's client sets the global weights on the host: use --backend {SPECIALIZED} or {PORTABLE}")
        values["backend"] = values["backend"] or host_backend(values["artifacts"])
        config = TrainConfig(**values)
        config.validate()
        return config

    def send_of(self, client: int, node: dict[str, Any] | None = None) -> str:
        send = self.send
        for clients, overrides in client_overrides(self.client_config):
            send = overrides.get("send", send) if client in clients else send
        return str((node or {}).get("send", send))


def _override(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A client's own budget replaces the fleet's (whatever its unit); other settings are set one by one."""
    if BUDGET_KEYS & set(overrides):
        values.update(dict.fromkeys(BUDGET_KEYS))
    values.update(overrides)


def client_overrides(text: str) -> list[tuple[set[int], dict[str, Any]]]:
    """'0-4: budget-ratio=0.088; 5: selector=random' -> [({0..4}, {'budget_ratio': 0.088}), ({5}, {...})]."""
    entries = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        who, colon, rest = part.partition(":")
        if not colon:
            raise NeqError(f"--client-config entries are CLIENTS: KEY=VALUE ..., e.g. '0-4: budget-ratio=0.088', not {part!r}")
        entries.append((_clients(who.strip()), _pairs(rest, CLIENT_KEYS)))
    return entries


def node_overrides(node: dict[str, Any]) -> dict[str, Any]:
    """The train settings a SuperNode's node config sets (its budget, data, artifacts, ...)."""
    return _typed({k.replace("-", "_"): v for k, v in node.items() if k.replace("-", "_") in CLIENT_KEYS + NODE_KEYS})


def _clients(text: str) -> set[int]:
    low, dash, high = text.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise NeqError(f"--client-config clients are I or I-J (e.g. 0-4), not {text!r}")
    return set(range(int(low), int(high or low) + 1))


def _pairs(text: str, keys: tuple[str, ...]) -> dict[str, Any]:
    values = {}
    for pair in text.split():
        key, eq, value = pair.partition("=")
        key = key.replace("-", "_")
        if not eq or key not in keys:
            raise NeqError(f"--client-config sets KEY=VALUE with KEY one of {', '.join(k.replace('_', '-') for k in keys)}, not {pair!r}")
        values[key] = value
    return _typed(values)


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    """Values as their settings' types (a node config may already hold ints and floats)."""
    kinds = {s.name: s.kind for s in settings_of(TrainConfig)} | {"send": str}
    out = {}
    for key, value in values.items():
        try:
            out[key] = kinds[key](value)
        except (TypeError, ValueError):
            raise NeqError(f"client setting {key.replace('_', '-')}={value!r} is not a {kinds[key].__name__}") from None
    return out


def host_backend(artifacts: str) -> str:
    """The specialised backend for SGD artifacts (it computes only what the selection trains), else portable."""
    from onnx_neq.manifest import read_manifest

    return SPECIALIZED if read_manifest(artifacts).optimizer == "sgd" else PORTABLE
