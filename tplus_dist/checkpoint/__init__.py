"""Checkpoints: save / publish / verify / resume / retention / signals (see store.py and manager.py)."""

from tplus_dist.checkpoint.manager import CheckpointManager, SaveResult
from tplus_dist.checkpoint.store import Checkpoint, CheckpointError, find_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "SaveResult", "find_checkpoint"]
