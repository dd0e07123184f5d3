"""Sequence parallelism against plain tensor parallelism: tokens/s and each rank's activation bytes.

    python -m tplus_dist.parallel.bench_sp [--config configs/tiny.yaml] [--tp 2] [--seq-len 256] [--batch 4]
        [--steps 10] [override ...]

Spawns ``--tp`` gloo processes on this machine (CPU), builds the config's decoder under TP (megatron-core layers),
once without and once with ``parallel.sequence_parallel``, and times forward + backward of ``--batch`` sequences
of ``--seq-len`` tokens (``--steps`` timed after 2 warm-up steps; no optimizer, no DeepSpeed: the layers alone).
Then it measures, on each rank, the bytes the decoder layers save for backward (tplus_dist/memory.py; embedding,
head and loss left out: their split is the vocabulary's either way) and those of the whole forward and loss. One
process's layer bytes are printed beside them: with SP each rank should hold 1/tp of them.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def _measure(cfg: Any, layout: Any, batch: int, steps: int) -> dict[str, float]:
    from tplus_dist.memory import saved_tensor_bytes
    from tplus_dist.train.run import build_decoder, seed_everything

    seed_everything(cfg.train.seed)
    model: Any = build_decoder(cfg, layout, torch.device("cpu"))
    model.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.seq_len + 1), generator=gen)

    def step() -> torch.Tensor:
        loss, _ = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        return loss

    for _ in range(2):
        step().backward()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step().backward()
    elapsed = time.perf_counter() - start
    x = model.embed_tokens(tokens[:, :-1])

    def layers() -> None:
        h = x
        for layer in model.layers.values():
            h = layer(h)

    buffers = list(model.buffers())
    return {
        "tokens_per_s": steps * batch * cfg.seq_len / elapsed,
        "layer_bytes": saved_tensor_bytes(layers, exclude=buffers),
        "total_bytes": saved_tensor_bytes(step, exclude=buffers),
    }


def _rank(rank: int, world: int, config: str, overrides: list[str], batch: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from tplus_dist.config import load_config
    from tplus_dist.parallel.groups import destroy_process_groups
    from tplus_dist.train.run import setup_layout

    rows = []
    try:
        for sp in (False, True):
            cfg = load_config(
                config,
                [*overrides, f"--parallel.tensor_parallel={world}", f"--parallel.sequence_parallel={str(sp).lower()}"],
            )
            try:
                row = _measure(cfg, setup_layout(cfg, torch.device("cpu")), batch, steps)
            finally:
                destroy_process_groups(keep_world=True)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, row)
            rows.append((sp, gathered))
    finally:
        destroy_process_groups()
    if rank == 0:
        torch.save(rows, out)


def main(argv: list[str] | None = None) -> None:
    import tempfile
    from pathlib import Path

    from tplus_dist.config import load_config
    from tplus_dist.spawn import run_distributed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="--section.key=value overrides of the config")
    args = ap.parse_args(argv)
    overrides = [f"--model.seq_len={args.seq_len}", "--log.progress=false", *args.overrides]
    one_cfg = load_config(args.config, overrides)
    from tplus_dist.train.run import Layout

    one = _measure(one_cfg, Layout(), args.batch, max(1, args.steps // 2))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.pt"
        run_distributed(_rank, args.tp, args.config, overrides, args.batch, args.steps, str(out))
        rows = torch.load(out)
    m = one_cfg.model
    print(
        f"{args.config}: {m.n_layers} layers, d_model {m.d_model}, batch {args.batch} x seq {args.seq_len}, "
        f"TP {args.tp} on gloo (CPU, {torch.get_num_threads()} threads here, 1 per rank)"
    )
    print(
        f"one process: layer activations {one['layer_bytes'] / 2**20:.2f} MiB, "
        f"total {one['total_bytes'] / 2**20:.2f} MiB"
    )
    print(f"{'layout':<10}{'tokens/s':>10}  per rank: layer activations MiB (of one process)   total MiB")
    for sp, gathered in rows:
        tps = gathered[0]["tokens_per_s"]
        layer = "  ".join(
            f"{g['layer_bytes'] / 2**20:.2f} ({g['layer_bytes'] / one['layer_bytes']:.3f})" for g in gathered
        )
        total = "  ".join(f"{g['total_bytes'] / 2**20:.2f}" for g in gathered)
        print(f"{'TP+SP' if sp else 'TP':<10}{tps:>10.0f}  {layer:<44}{total}")


if __name__ == "__main__":
    main()
