"""The server's side of a fleet, without the transport: its folder, its global parameters, a round's merge and
its rows. The Flower ServerApp (flower_app.py) drives it.

OUT/settings.json    the fleet's settings (a later command on the same OUT must give the same ones: it resumes)
OUT/global.npz       the global parameters that travel (client.traveling) after the last completed round
OUT/state.json       {"round": last completed round}; written last, so a server killed at any moment restarts
                     from the last completed round (a half-done round is run again)
OUT/rounds.csv       one row per round and client (ROUND_COLUMNS); round 0 is the starting model (client "-")
OUT/model.onnx       the global model as an inference model (what `onnx-neq eval` scores), after every round
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_neq.backends.base import PORTABLE, open_backend
from onnx_neq.errors import NeqError
from onnx_neq.fleet.client import Traveling, traveling
from onnx_neq.fleet.config import FleetConfig
from onnx_neq.fleet.updates import ChannelUpdate, aggregate, check_update
from onnx_neq.manifest import Manifest, read_manifest
from onnx_neq.selection.registry import SELECTORS
from onnx_neq.training.default_model import artifacts_with_head
from onnx_neq.training.evaluate import evaluate, record_normalization
from onnx_neq.training.files import atomic_write_bytes, read_run_json
from onnx_neq.training.setup import load_run_dataset

log = logging.getLogger(__name__)

ROUND_COLUMNS = (
    "round", "client", "examples", "budget", "updated_params", "bytes_sent", "bytes_received", "local_top1", "global_top1", "note",
)  # fmt: skip


@dataclass
class Reply:
    """One client's answer to a round, as the transport delivered it."""

    client: str
    update: ChannelUpdate
    budget: str = ""
    updated_params: int = 0
    local_top1: float = float("nan")
    bytes_received: int = 0
    error: str = ""  # the transport's reason where the client sent no update (crashed, killed, timed out)


class FleetServer:
    """OUT of a fleet: its settings, global parameters and rounds."""

    def __init__(self, config: FleetConfig):
        config.validate()
        self.config, self.out = config, Path(config.out)
        manifest = read_manifest(config.artifacts)
        classes = _class_count(config, manifest)
        config.artifacts = str(artifacts_with_head(config.artifacts, classes).resolve())
        self.manifest = read_manifest(config.artifacts)
        self.travel: Traveling = traveling(self.manifest, config.bn_update)
        self.session = open_backend(PORTABLE, config.artifacts)
        spec = SELECTORS[config.selector]
        if spec.first_epoch and spec.policy and config.epochs == 1:  # a policy of its own keeps no state between rounds
            log.warning(
                "--selector %s starts every round with its first-epoch rule (%s): with --epochs 1 that is all it does; "
                "give --epochs 2 or more", config.selector, config.first_epoch_init,
            )  # fmt: skip

    # folder ------------------------------------------------------------------------------
    def start(self) -> tuple[int, dict[str, np.ndarray]]:
        """(the first round to run, the global parameters): a new OUT starts at round 1 from the artifacts (and
        scores them as round 0); an OUT of the same settings continues after its last completed round."""
        settings = json.loads(json.dumps(dataclasses.asdict(self.config)))
        if (self.out / "settings.json").exists():
            return self._resume(settings)
        if self.out.exists() and any(self.out.iterdir()):
            raise NeqError(f"{self.out} exists and holds no fleet; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out / "settings.json", json.dumps(settings, indent=1).encode())
        params = {name: self.session.parameter(name) for name in self.travel.names}
        row = {"round": 0, "client": "-", "examples": 0, "updated_params": 0, "bytes_sent": 0, "bytes_received": 0}
        self.commit(0, params, [row])
        return 1, params

    def _resume(self, settings: dict) -> tuple[int, dict[str, np.ndarray]]:
        stored = read_run_json(self.out / "settings.json")
        changed = sorted(
            k for k in set(stored) | set(settings) if k not in ("rounds", "round_timeout") and stored.get(k) != settings.get(k)
        )
        if changed:
            raise NeqError(
                f"{self.out} holds a fleet with other settings ({', '.join(changed)}); give the same ones or choose another --out"
            )
        state = read_run_json(self.out / "state.json")
        done = state.get("round") if isinstance(state, dict) else None
        if not isinstance(done, int) or done < 0:
            raise NeqError(f"{self.out}/state.json is damaged; choose another --out")
        with np.load(self.out / "global.npz", allow_pickle=False) as stored_params:
            params = {name: stored_params[name] for name in self.travel.names}
        log.info("resuming %s after round %d", self.out, done)
        return done + 1, params

    def rows(self) -> list[dict]:
        path = self.out / "rounds.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def commit(self, round_: int, params: dict[str, np.ndarray], rows: list[dict]) -> None:
        """Round `round_` done: its global parameters, model.onnx, its rows with model.onnx's test top-1 (rows of
        later rounds dropped), then state.json."""
        buffer = io.BytesIO()
        np.savez(buffer, **params)
        atomic_write_bytes(self.out / "global.npz", buffer.getvalue())
        self._write_model(params, self.out / "model.onnx")
        top1 = f"{self.score():.4f}"
        rows = [{**r, "global_top1": top1} for r in rows]
        kept = [r for r in self.rows() if int(r["round"]) < round_]
        text = io.StringIO()
        writer = csv.DictWriter(text, ROUND_COLUMNS, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(kept + rows)
        atomic_write_bytes(self.out / "rounds.csv", text.getvalue().encode())
        atomic_write_bytes(self.out / "state.json", json.dumps({"round": round_}).encode())

    # a round -----------------------------------------------------------------------------
    def merge(self, round_: int, params: dict[str, np.ndarray], replies: list[Reply]) -> dict[str, np.ndarray]:
        """Check each reply against the global parameters, aggregate the good ones, score and commit the round."""
        accepted, rows = [], []
        for reply in sorted(replies, key=lambda r: r.client):
            reason = reply.error or check_update(reply.update, params)
            if reply.error:
                log.warning("round %d: client %s sent no update: %s", round_, reply.client, reason)
            elif reason:
                log.warning("round %d: rejected the update of client %s: %s", round_, reply.client, reason)
            else:
                accepted.append(reply.update)
            rows.append(_row(round_, reply, f"{'failed' if reply.error else 'rejected'}: {reason}" if reason else ""))
        if not accepted:
            log.warning("round %d: no update accepted; the global model is unchanged", round_)
        merged = aggregate(params, accepted)
        self.commit(round_, merged, rows)
        return merged

    def score(self) -> float:
        """Test top-1 of OUT/model.onnx, as `onnx-neq eval` scores it."""
        return evaluate(self.out / "model.onnx", self.config.data, self.config.classes, batch_size=self.config.eval_batch_size).top1

    def _write_model(self, params: dict[str, np.ndarray], path: Path) -> None:
        self.session.set_parameters(params)
        tmp = path.with_name(f".{path.name}.tmp")
        self.session.export_inference(tmp)
        record_normalization(tmp, self.manifest.input.mean, self.manifest.input.std)
        tmp.replace(path)


def _row(round_: int, reply: Reply, note: str) -> dict:
    return {
        "round": round_,
        "client": reply.client,
        "examples": reply.update.examples if not reply.error else 0,
        "budget": reply.budget,
        "updated_params": reply.updated_params,
        "bytes_sent": reply.update.nbytes(),
        "bytes_received": reply.bytes_received,
        "local_top1": f"{reply.local_top1:.4f}",
        "note": note,
    }


def _class_count(config: FleetConfig, manifest: Manifest) -> int:
    """The data's class count (the head the fleet trains; a different one is prepared as train does)."""
    return load_run_dataset(dataclasses.replace(config, shard=None), manifest).num_classes
