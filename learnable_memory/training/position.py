"""Where a fit stands in its data, so that a resumed fit continues exactly where the interrupted one was:
the random states (torch, numpy, python, CUDA) as plain containers and tensors, the generators that order
an epoch of a loader, and the rest of an interrupted epoch.

An epoch's order is drawn when its iteration begins: a shuffling ``RandomSampler`` draws its permutation
from its generator (from torch's global one when it has none), and the loader draws its workers' base
seed from its own. So a fit keeps those states as they were at the start of each epoch; a resumed fit
puts them back, begins the epoch again with ``accelerate.skip_first_batches`` (the batches already
trained on are skipped by index, never loaded) and then puts back every random state as it was at the
checkpoint. That is exact for data whose items draw no random numbers (``train``'s transforms draw none);
a dataset with random augmentation resumes the same order of items, with other augmentations, since the
loader reads ahead of the step. Under ``accelerate launch`` the data order resumes exactly too
(``accelerate`` hands every process the generator of process 0 when an epoch begins, every process skips
its own shard's batches, and every process reads the same checkpoint); the global random states of every
process are then those process 0 saved.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from accelerate import skip_first_batches
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, RandomSampler


def loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The generators an epoch of ``loader`` draws from (the loader's own, its shuffling sampler's), once each."""
    batches = loader.batch_sampler
    if isinstance(batches, BatchSamplerShard):
        batches = batches.batch_sampler
    sampler = batches.sampler if isinstance(batches, BatchSampler) else loader.sampler
    found = [loader.generator, sampler.generator if isinstance(sampler, RandomSampler) else None]
    out: list[torch.Generator] = []
    for g in found:
        if g is not None and all(g is not h for h in out):
            out.append(g)
    return out


def epoch_start(generators: list[torch.Generator]) -> dict:
    """What orders the epoch about to begin: torch's global random state and ``generators``' states."""
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}


def rng_states() -> dict:
    """Every global random state (torch, numpy, python, and CUDA when it is available), as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)},
           "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                      "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` gave (CUDA only when it is here with as many devices)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rest_of_epoch(loader: DataLoader, generators: list[torch.Generator], start: dict, skip: int,
                  rng: dict) -> Iterator:
    """The batches of an interrupted epoch after its first ``skip``: the epoch begun again from its ``start``
    states (:func:`epoch_start`), then every random state put back to ``rng`` (:func:`rng_states`)."""
    torch.set_rng_state(start["torch"])
    for g, state in zip(generators, start["generators"], strict=True):
        g.set_state(state)
    batches = iter(skip_first_batches(loader, skip) if skip else loader)
    first = next(batches, None)  # the epoch's order is drawn by now
    set_rng_states(rng)
    if first is None:
        return
    yield first
    yield from batches
