"""The checkpoint of an `OIALR` (`OIALR.state_dict`): its version and the checks of a saved
state before `OIALR.load_state_dict` changes anything."""

from __future__ import annotations

from .oialr_history import copy_entry, is_entry

# 2: history entries record parameter counts; version 1's entries ({step, ranks}) still load.
STATE_VERSION = 2
_READABLE = (1, STATE_VERSION)


def check_state(state, delay: int, config: dict) -> tuple[int, bool, dict, list]:
    """(steps, converted, ranks, history) of a saved OIALR state, checked against the `delay`
    and the settings `config` of the OIALR loading it; ValueError naming what is wrong."""
    if not isinstance(state, dict):
        raise ValueError(f"OIALR.load_state_dict: expected a dict, got {type(state).__name__}")
    expected = {"version", "steps", "converted", "ranks", "config", "history"}
    if set(state) != expected:
        raise ValueError(
            f"OIALR.load_state_dict: keys {sorted(state)} are not an OIALR state "
            f"({sorted(expected)})"
        )
    if state["version"] not in _READABLE:
        raise ValueError(
            f"OIALR.load_state_dict: state version {state['version']!r}, this release reads "
            f"{_READABLE}"
        )
    steps, converted = state["steps"], state["converted"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"OIALR.load_state_dict: 'steps' must be an int >= 0, got {steps!r}")
    if not isinstance(converted, bool) or converted != (steps >= delay):
        raise ValueError(
            f"OIALR.load_state_dict: 'converted'={converted!r} disagrees with steps={steps} "
            f"and delay={delay}"
        )
    saved = state["config"]
    if not isinstance(saved, dict) or saved != config:
        differing = (
            sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            if isinstance(saved, dict)
            else "all"
        )
        raise ValueError(
            f"OIALR.load_state_dict: the checkpoint was made with other settings "
            f"({differing}): saved {saved!r}, this OIALR has {config!r}"
        )
    ranks, history = state["ranks"], state["history"]
    if not isinstance(ranks, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in ranks.items()
    ):
        raise ValueError(f"OIALR.load_state_dict: 'ranks' must map names to ints, got {ranks!r}")
    if converted != bool(ranks):
        raise ValueError(
            f"OIALR.load_state_dict: 'ranks' {'missing' if converted else 'present'} in a "
            f"state with converted={converted}"
        )
    if not isinstance(history, list) or not all(is_entry(e) for e in history):
        raise ValueError(
            "OIALR.load_state_dict: 'history' must be a list of {step, ranks, parameters, "
            "trainable} (the first also with dense: {parameters, trainable}; version 1: "
            "{step, ranks})"
        )
    return steps, converted, dict(ranks), [copy_entry(entry) for entry in history]


def check_saved_ranks(ranks: dict, limits: dict[str, int]) -> None:
    """Before changing anything: the saved names and ranks fit this model's layers, whose full
    ranks are `limits` ({name: min(in, out)})."""
    if set(ranks) != set(limits):
        extra = sorted(set(ranks) - set(limits))
        lacking = sorted(set(limits) - set(ranks))
        raise ValueError(
            f"OIALR.load_state_dict: the checkpoint's layers differ from this model's "
            f"(only in the checkpoint: {extra}; only in the model: {lacking})"
        )
    for name, rank in ranks.items():
        limit = limits[name]
        if not 1 <= rank <= limit:
            raise ValueError(
                f"OIALR.load_state_dict: rank {rank} for {name!r} is outside [1, {limit}]"
            )
