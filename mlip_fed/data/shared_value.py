"""An integer the training process sets and its DataLoader workers read: the epoch of persistent workers.

A worker is a copy of the dataset and collate function made when it starts. With ``persistent_workers`` it lives
across epochs (and federated rounds), so a per-epoch setting made later in the training process (the augmentation
seed, the counterfactual epoch) would never reach it. The value lives in shared memory, inherited by forked workers
(and handed to spawned ones while they start), so a worker reads what the trainer set before the epoch began.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import get_spawning_popen
from typing import Any


class SharedInt:
    """A 64-bit integer in shared memory. Pickled outside a worker's start (``copy.deepcopy``, ``pickle.dumps``) it
    becomes an unshared copy holding the current value: shared memory cannot travel any other way."""

    def __init__(self, value: int = 0) -> None:
        self._raw: Any = mp.RawValue("q", value)

    @property
    def value(self) -> int:
        return int(self._raw.value)

    @value.setter
    def value(self, new: int) -> None:
        self._raw.value = int(new)

    def __reduce__(self) -> tuple[Any, ...]:
        if get_spawning_popen() is not None:  # starting a worker process: hand over the shared memory itself
            return (_attach, (self._raw,))
        return (SharedInt, (self.value,))


def _attach(raw: Any) -> SharedInt:
    shared = SharedInt.__new__(SharedInt)
    shared._raw = raw
    return shared
