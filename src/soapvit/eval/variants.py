"""Which variants an evaluation scores, and which of them need a forward pass of their own."""

from __future__ import annotations

from collections.abc import Mapping

from ..backbones.base import Backbone
from ..runlog import RunLog


def plan_variants(corrections: Mapping | None, backbone: Backbone, *, reads_keys: bool, log: RunLog) -> tuple[dict, dict]:
    """``(corrections to encode, {name: "same pass" | "own pass"})``. With ``reads_keys``, a
    correction that maps the output tokens leaves the last block's keys as they are: it is left
    out with a warning instead of being scored as a copy of ``original``."""
    chosen, passes = {}, {"original": "same pass"}
    for name, correction in (corrections or {}).items():
        maps = correction.maps_output(backbone)
        if reads_keys and maps:
            log.warn(f"{name} maps the output tokens, not the attention keys: left out of a keys evaluation")
            continue
        chosen[name] = correction
        passes[name] = "same pass" if maps else "own pass"
    return chosen, passes


def describe_variant(correction) -> dict:
    """What a report records of a correction: method, parameters, block."""
    return {"method": correction.method, "params": correction.get_params(), "block": correction.block_}
