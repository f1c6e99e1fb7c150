"""onnx-neq's Flower app: a ServerApp that holds the global parameters and merges channel updates, a ClientApp
that fine-tunes them with the shared training loop, and the messages between them.

server -> client  "arrays": the global parameters that travel (ArrayRecord, one Array per parameter)
                  "config": "server-round" (from 1) and "fleet" (the fleet's settings as JSON)
client -> server  "arrays": "rows/NAME/indices" (int32) and "rows/NAME/values", "whole/NAME" (float32)
                  "metrics": "num-examples", "local-top1", "updated-params"
                  "info": "client" (its name in rounds.csv), "budget"
a client's own  Context.state "onnx-neq-selector": its selector's statistics, kept from round to round (not sent)

Each round the strategy (FedAvg's node sampling, so Flower's minimum-available settings hold) sends the global
parameters to the connected nodes, waits up to --round-timeout, and hands the replies to FleetServer.merge: a
node that crashed or was killed is a failed reply, a malformed update is rejected there, and the round goes on
with the rest. `server_app` and `client_app` are the deployment engine's components (app_dir.py writes the
project that names them); `simulate` runs both on Flower's simulation engine.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from onnx_neq.fleet.app_dir import fleet_from_json, fleet_from_run_config, fleet_run_config
from onnx_neq.fleet.client import local_round
from onnx_neq.fleet.config import FleetConfig
from onnx_neq.fleet.server import FleetServer, Reply
from onnx_neq.fleet.updates import ChannelUpdate

log = logging.getLogger(__name__)

ROWS, WHOLE = "rows/", "whole/"
SELECTOR_STATE = "onnx-neq-selector"  # in a ClientApp's Context.state: its selector's statistics, kept between rounds


# messages -----------------------------------------------------------------------------------
def params_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value, order="C")) for name, value in params.items()})  # (ascontiguousarray makes 0-d 1-d)


def update_record(update: ChannelUpdate) -> ArrayRecord:
    arrays = {}
    for name, (indices, values) in update.rows.items():
        arrays[f"{ROWS}{name}/indices"], arrays[f"{ROWS}{name}/values"] = indices, values
    arrays.update({f"{WHOLE}{name}": value for name, value in update.whole.items()})
    return params_record(arrays)


def read_update(record: ArrayRecord, examples: object) -> ChannelUpdate:
    """The update in a client's ArrayRecord, as sent (FleetServer checks it); a key of no known form, or rows
    without their indices or values, are kept as an unknown parameter so that the check rejects them."""
    rows: dict[str, list] = {}
    whole = {}
    for key in record.keys():
        try:
            value = record[key].numpy()
        except (TypeError, ValueError, OSError):  # not a numpy array (another serialization, a torn payload)
            whole[f"(unreadable array {key})"] = None
            continue
        if key.startswith(WHOLE):
            whole[key[len(WHOLE) :]] = value
        elif key.startswith(ROWS) and key.rsplit("/", 1)[-1] in ("indices", "values"):
            name, part = key[len(ROWS) :].rsplit("/", 1)
            rows.setdefault(name, [None, None])[part == "values"] = value
        else:
            whole[f"(unknown key {key})"] = value
    return ChannelUpdate(examples, {name: tuple(pair) for name, pair in rows.items()}, whole)  # type: ignore[arg-type]


# server -------------------------------------------------------------------------------------
class ChannelFedAvg(FedAvg):
    """FedAvg's sampling and waiting; the merge is FleetServer's (per channel, checked)."""

    def __init__(self, server: FleetServer):
        n = server.config.min_clients or server.config.clients
        super().__init__(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        self.server = server

    def replies(self, server_round: int, messages: Iterable[Message], bytes_received: int) -> list[Reply]:
        out = []
        for msg in messages:
            node = str(msg.metadata.src_node_id)
            if msg.has_error():
                log.debug("round %d: node %s failed:\n%s", server_round, node, msg.error.reason)
                out.append(Reply(node, ChannelUpdate(1), error=failure_reason(str(msg.error.reason))))
                continue
            try:
                out.append(_reply(msg.content, node, bytes_received))
            except (TypeError, ValueError, KeyError) as exc:
                out.append(Reply(node, ChannelUpdate(1), error=f"a malformed reply ({exc})"[:300]))
        return out


def failure_reason(text: str) -> str:
    """The line of a failed client's report that says what went wrong (a traceback's last "...Error: ..." line),
    cut to 300 characters; the whole report is logged at debug level."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return (errors[-1] if errors else lines[-1] if lines else "no reason given")[:300]


def _reply(content: RecordDict, node: str, bytes_received: int) -> Reply:
    metrics, info = content.metric_records.get("metrics", {}), content.config_records.get("info", {})
    arrays = content.array_records.get("arrays", ArrayRecord())
    return Reply(
        str(info.get("client", node)),
        read_update(arrays, metrics.get("num-examples")),
        str(info.get("budget", "")),
        int(metrics.get("updated-params", 0)),
        float(metrics.get("local-top1", float("nan"))),
        bytes_received,
    )


def serve(grid: Grid, server: FleetServer) -> None:
    """The fleet's rounds, from the last completed one in OUT (see FleetServer)."""
    config = server.config
    first, params = server.start()
    strategy = ChannelFedAvg(server)
    settings = json.dumps(fleet_run_config(config))
    for round_ in range(first, config.rounds + 1):
        log.info("round %d/%d: waiting for %d clients", round_, config.rounds, strategy.min_available_nodes)
        messages = strategy.configure_train(round_, params_record(params), ConfigRecord({"fleet": settings}), grid)
        replies = grid.send_and_receive(messages, timeout=config.round_timeout)
        sent = int(sum(v.nbytes for v in params.values()))
        params = server.merge(round_, params, strategy.replies(round_, replies, sent))
        last = [r for r in server.rows() if r["round"] == str(round_)]
        log.info("round %d/%d: %d replies, global top-1 %s", round_, config.rounds, len(last), last[0]["global_top1"] if last else "-")


def _deployed_main(grid: Grid, context: Context) -> None:
    serve(grid, FleetServer(fleet_from_run_config(dict(context.run_config))))


server_app = ServerApp()
server_app.main()(_deployed_main)


# client -------------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    fleet = fleet_from_json(str(config["fleet"]))
    node = dict(context.node_config)
    client = int(node.get("partition-id", 0))
    name = str(node.get("name", client if "partition-id" in node else context.node_id))
    local = fleet.local(client, int(config["server-round"]), node)
    params = {key: array.numpy() for key, array in msg.content.array_records["arrays"].items()}
    kept = context.state.array_records.get(SELECTOR_STATE)  # this node's selector statistics from its last round
    carried = {key: array.numpy() for key, array in kept.items()} if kept else None
    result = local_round(local, params, fleet.send_of(client, node), workdir=node.get("workdir"), selector_state=carried)
    if result.selector_state:
        context.state[SELECTOR_STATE] = params_record(result.selector_state)
    metrics = MetricRecord(
        {"num-examples": result.update.examples, "local-top1": result.local_top1, "updated-params": result.updated_params}
    )
    info = ConfigRecord({"client": name, "budget": result.budget})
    return Message(RecordDict({"arrays": update_record(result.update), "metrics": metrics, "info": info}), reply_to=msg)


# simulation ---------------------------------------------------------------------------------
def simulate(config: FleetConfig) -> FleetServer:
    """Run the fleet on Flower's simulation engine: config.clients SuperNodes in this machine's process tree,
    one client at a time using every core. Raises what the ServerApp raised."""
    from flwr.simulation import run_simulation

    server = FleetServer(config)
    failure: list[BaseException] = []

    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, server)
        except BaseException as exc:  # re-raised below, where the caller can report it
            failure.append(exc)

    app = ServerApp()
    app.main()(main)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here; silences Ray's notice about them
    cpus = os.cpu_count() or 1
    run_simulation(app, client_app, num_supernodes=config.clients, backend_config={"client_resources": {"num_cpus": cpus}})
    if failure:
        raise failure[0]
    return server
