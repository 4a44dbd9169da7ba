"""The entries of `OIALR.history`: one per conversion or update, with the model's parameter
counts after it (and, for the conversion, before it), logged as they are made; their checks and
copies for checkpoints (`oialr_checkpoint`)."""

from __future__ import annotations

import logging

from torch import nn

from ..nn import count_parameters

_LOG = logging.getLogger("lowrank_ext")
_KEYS = {"step", "ranks"}
_COUNTS = {"parameters", "trainable"}


def counts(model: nn.Module) -> dict[str, int]:
    """{"parameters": every number the model holds, "trainable": those that train}."""
    total, trainable = count_parameters(model)
    return {"parameters": total, "trainable": trainable}


def entry(model: nn.Module, step: int, ranks: dict, dense: dict | None = None) -> dict:
    """The history entry of the update at `step`, or of the conversion when `dense` (the dense
    model's `counts`) is given; logged at INFO on the logger "lowrank_ext"."""
    record = {"step": step, "ranks": ranks, **counts(model)}
    if dense is None:
        _LOG.info(
            "OIALR step %d: ranks %s; %s parameters, %s trainable",
            step,
            ranks,
            f"{record['parameters']:,}",
            f"{record['trainable']:,}",
        )
        return record
    record["dense"] = dense
    _LOG.info(
        "OIALR step %d: %d layers converted at full rank; parameters %s -> %s, trainable %s -> %s",
        step,
        len(ranks),
        f"{dense['parameters']:,}",
        f"{record['parameters']:,}",
        f"{dense['trainable']:,}",
        f"{record['trainable']:,}",
    )
    return record


def is_entry(record) -> bool:
    """A saved entry: {step, ranks, parameters, trainable} (+ dense for the conversion), or
    version 1's {step, ranks}."""
    if not isinstance(record, dict) or not isinstance(record.get("ranks"), dict):
        return False
    if set(record) == _KEYS:
        return True
    if set(record) - {"dense"} != _KEYS | _COUNTS:
        return False
    numbers = [record[key] for key in _COUNTS]
    if "dense" in record:
        dense = record["dense"]
        if not isinstance(dense, dict) or set(dense) != _COUNTS:
            return False
        numbers += list(dense.values())
    return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)


def copy_entry(record: dict) -> dict:
    """A copy of an entry that shares no dict with it."""
    copied = dict(record, ranks=dict(record["ranks"]))
    if "dense" in record:
        copied["dense"] = dict(record["dense"])
    return copied
