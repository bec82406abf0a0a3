"""The calibration engine (:mod:`.engine`) and the model-family table (:mod:`.families`)."""

from .engine import (
    BlockInput,
    BlockSource,
    InMemoryBlocks,
    InputStats,
    Step,
    StopForward,
    calibration_tokens,
    capture_inputs,
    find_blocks,
    fold_scale,
    input_stats,
    observe,
    run_block,
    run_sequential,
)
from .families import FAMILIES, Family, Group, family_of, supporting

__all__ = [
    "FAMILIES", "BlockInput", "BlockSource", "Family", "Group", "InMemoryBlocks", "InputStats",
    "Step", "StopForward", "calibration_tokens", "capture_inputs", "family_of", "find_blocks",
    "fold_scale", "input_stats", "observe", "run_block", "run_sequential", "supporting",
]
