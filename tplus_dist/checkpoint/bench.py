"""Checkpoint save / load throughput: `python -m tplus_dist.checkpoint.bench [--preset llama-1.1b] [--dir DIR]`.

Builds the preset's decoder with AdamW moments allocated (fp32: 4 bytes x 3 per parameter, about 13 GB for
llama-1.1b), then times, through the same CheckpointManager a run uses, one save (write, checksums, publish: the
step loop stalls this long in a synchronous save) and one load (checksum verification, then the parameters and
moments read back into the model and optimizer); with --background also a background save (the stall is the
snapshot to host memory). Prints GB and GB/s. One process; a distributed save writes each rank's shards in
parallel.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tplus_dist.checkpoint.manager import CheckpointManager
from tplus_dist.checkpoint.sharded import load_state
from tplus_dist.checkpoint.store import find_checkpoint, verify_files
from tplus_dist.config import load_config
from tplus_dist.model import build_model


class _Nothing:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1.1b", help="a model preset under configs/models/")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    ap.add_argument(
        "--background",
        action="store_true",
        help="also time a background save (checkpoint.background): the step loop's stall and the time to publish; "
        "needs host memory for a second copy of the state",
    )
    args = ap.parse_args(argv)
    cfg = load_config(f"configs/models/{args.preset}.yaml")
    print(f"building {args.preset} with AdamW moments ...", flush=True)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # allocates exp_avg and exp_avg_sq
    model.zero_grad(set_to_none=True)
    trainer = SimpleNamespace(
        model=model, optimizer=opt, scheduler=_Nothing(), train_data=_Nothing(), runner=None,
        state=SimpleNamespace(step=1, tokens=0), layout=None, device=torch.device("cpu"),
    )  # fmt: skip
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tplus-ckpt-bench-"))
    try:
        manager = CheckpointManager(cfg, base / "checkpoints")
        saved = manager.save(trainer)
        gb = saved.bytes / 1e9
        ckpt = find_checkpoint(base / "checkpoints")
        t0 = time.perf_counter()
        verify_files(ckpt)
        t_verify = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_state(trainer, ckpt.path, ckpt.manifest["state"])  # what a resume does, on any layout
        t_read = time.perf_counter() - t0
        background = []
        if args.background:  # twice: the first allocates the host buffers, later saves reuse them
            for step in (2, 3):
                trainer.state.step = step
                stall = manager.save_in_background(trainer)
                done = manager.wait()
                assert done is not None
                background.append((stall, done.seconds))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"{'preset':<12} {'params':>8} {'state GB':>9} {'save s':>7} {'save GB/s':>10} {'verify s':>9} "
          f"{'read s':>7} {'load GB/s':>10}")  # fmt: skip
    print(f"{args.preset:<12} {n / 1e9:>7.2f}B {gb:>9.2f} {saved.seconds:>7.1f} {gb / saved.seconds:>10.2f} "
          f"{t_verify:>9.1f} {t_read:>7.1f} {gb / (t_verify + t_read):>10.2f}")  # fmt: skip
    print("step-loop stall per synchronous save = save s")
    for which, (stall, total) in zip(("first", "later"), background, strict=False):
        print(f"background save ({which}): the step loop waits {stall:.1f} s (snapshot to host memory, "
              f"{gb / stall:.2f} GB/s), published after {total:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
