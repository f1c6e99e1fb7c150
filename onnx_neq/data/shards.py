"""How a fleet's training data is spread over its clients: IID, or by a Dirichlet label split.

    iid             the images shuffled with the seed and cut into N parts whose sizes differ by at most one
    dirichlet:ALPHA for each class, shares over the N clients drawn from Dirichlet(ALPHA, ..., ALPHA), and the
                    class's images (shuffled) cut at those shares; small ALPHA gives each client few classes,
                    large ALPHA approaches IID. Draws repeat (up to 100 times, new draws from the same
                    generator) until every client holds at least `min_size` images, as is usual for this split.

Every split is a partition of the indices (each image to exactly one client) and depends only on the labels,
the spec, N and the seed. A `Shard` names one client's part: CLIENT/CLIENTS/SPLIT/SEED, e.g. 2/10/dirichlet:0.5/0
(a run's `shard` setting: the client trains on that part of the training split only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_neq.errors import NeqError

IID, DIRICHLET = "iid", "dirichlet"


@dataclass(frozen=True)
class Shard:
    client: int
    clients: int
    split: str = IID
    seed: int = 0

    def __str__(self) -> str:
        return f"{self.client}/{self.clients}/{self.split}/{self.seed}"

    def indices(self, labels: np.ndarray) -> np.ndarray:
        """This client's indices into `labels` (the training split's)."""
        return split_clients(labels, self.clients, self.split, self.seed)[self.client]


def parse_shard(text: str) -> Shard:
    """'2/10/dirichlet:0.5/0' -> Shard(2, 10, 'dirichlet:0.5', 0); NeqError naming the form otherwise."""
    parts = str(text).split("/")
    form = "CLIENT/CLIENTS/SPLIT/SEED with 0 <= CLIENT < CLIENTS, e.g. 2/10/dirichlet:0.5/0"
    if len(parts) != 4 or not all(p.isdigit() for p in (parts[0], parts[1], parts[3])):
        raise NeqError(f"a shard must be {form}, not {text!r}")
    client, clients, seed = int(parts[0]), int(parts[1]), int(parts[3])
    if not 0 <= client < clients:
        raise NeqError(f"a shard must be {form}, not {text!r}")
    parse_split(parts[2])
    return Shard(client, clients, parts[2], seed)


def parse_split(spec: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5); NeqError naming the forms otherwise."""
    kind, _, value = spec.partition(":")
    if kind == IID and not value:
        return IID, None
    if kind == DIRICHLET:
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if np.isfinite(alpha) and alpha > 0:
            return DIRICHLET, alpha
    raise NeqError(f"--split must be iid or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5), not {spec!r}")


def split_clients(labels: np.ndarray, clients: int, spec: str, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Indices into `labels` for each of `clients` clients (sorted), by `spec`."""
    if clients < 1 or clients * min_size > len(labels):
        raise NeqError(f"{len(labels)} training images cannot give {clients} clients {min_size} or more each; use fewer --clients")
    kind, alpha = parse_split(spec)
    rng = np.random.default_rng([seed, 7])
    if kind == IID:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), clients)]
    for _ in range(100):
        parts = _dirichlet_parts(np.asarray(labels), clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise NeqError(f"dirichlet:{alpha:g} left a client with fewer than {min_size} images in 100 draws; raise ALPHA or use fewer --clients")


def _dirichlet_parts(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
