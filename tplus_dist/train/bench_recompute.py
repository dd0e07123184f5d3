"""`python -m tplus_dist.train.bench_recompute`: what each activation-recompute mode costs and saves.

For a model preset and batch, per mode (none, full uniform 1, full uniform 2, full block, selective core_attn,
mlp_act, layernorm, all three): training tokens/s (forward + backward + AdamW step, median of the repeats, the modes
interleaved so that each sees the same machine state) and the bytes saved for backward by one forward
(tplus_dist/memory.py, buffers such as rotary tables left out). Prints a table; nothing is asserted (benchmarks
print figures, BENCHMARKS.md records them with date and machine).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from typing import Any

import torch

from tplus_dist.config import ModelConfig, load_config
from tplus_dist.config.sections import ParallelConfig
from tplus_dist.memory import saved_tensor_bytes
from tplus_dist.model import build_model
from tplus_dist.model.decoder import Decoder
from tplus_dist.train.recompute import apply_recompute

MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "full uniform 1": dict(recompute_granularity="full"),
    "full uniform 2": dict(recompute_granularity="full", recompute_num_layers=2),
    "full block half": dict(recompute_granularity="full", recompute_method="block"),  # k set from n_layers
    "selective core_attn": dict(recompute_granularity="selective"),
    "selective mlp_act": dict(recompute_granularity="selective", recompute_modules=["mlp_act"]),
    "selective layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    "selective all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp_act", "layernorm"]),
}


def forward_loss(m: Decoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m.loss(m(x), y)[0]


def mode_config(name: str, n_layers: int) -> ParallelConfig:
    fields = dict(MODES[name])
    if name == "full block half":
        fields["recompute_num_layers"] = max(1, n_layers // 2)
    if fields.get("recompute_num_layers", 1) > n_layers:
        fields["recompute_num_layers"] = n_layers
    cfg = ParallelConfig(**fields)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tplus_dist.train.bench_recompute", description=__doc__)
    ap.add_argument("--model", default="tiny", help="a preset in configs/models (default tiny)")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0, help="attention and residual dropout")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    args = ap.parse_args(argv)
    over = [f"--model.seq_len={args.seq_len}", f"--model.attn_dropout={args.dropout}"]
    over.append(f"--model.resid_dropout={args.dropout}")
    if args.n_layers:
        over.append(f"--model.n_layers={args.n_layers}")
    mcfg: ModelConfig = load_config(f"configs/models/{args.model}.yaml", over).model
    names = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: {unknown[0]!r} is not one of {', '.join(MODES)}")
    torch.manual_seed(0)
    base = build_model(mcfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, mcfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
    y = torch.randint(0, mcfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
    models, opts, saved = {}, {}, {}
    for name in names:
        m = copy.deepcopy(base)
        apply_recompute(m, mode_config(name, mcfg.n_layers))
        models[name], opts[name] = m, torch.optim.AdamW(m.parameters(), lr=1e-4)
        saved[name] = saved_tensor_bytes(partial(forward_loss, m, x, y), exclude=list(m.buffers()))

    def step(name: str) -> None:
        m, opt = models[name], opts[name]
        loss, _ = m.loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in names:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    tokens = args.batch_size * args.seq_len
    ref, ref_cpu = statistics.median(times[names[0]]), statistics.median(cpu[names[0]])
    print(
        f"{args.model}: {mcfg.n_layers} layers, d_model {mcfg.d_model}, batch {args.batch_size} x {args.seq_len}, "
        f"dropout {args.dropout}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    # CPU seconds (process time) besides wall time: on a shared machine other processes stretch wall time
    print(
        f"{'mode':<22} {'tokens/s':>10} {'wall vs ' + names[0]:>14} {'cpu s/step':>11} {'cpu vs ' + names[0]:>13} "
        f"{'saved MiB':>10} {'saved vs ' + names[0]:>15}"
    )
    for name in names:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        print(
            f"{name:<22} {tokens / t:>10,.0f} {t / ref:>14.3f} {c:>11.3f} {c / ref_cpu:>13.3f} "
            f"{saved[name] / 2**20:>10.2f} {saved[name] / saved[names[0]]:>15.3f}"
        )


if __name__ == "__main__":
    main()
