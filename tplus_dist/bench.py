"""`tplus bench`: forward+backward tokens/s of a preset beside a plain-PyTorch nanoGPT-style
reference of the same shape, measured in the same process, interleaved so that both see the same
machine state. Prints a table; nothing is asserted (benchmarks print figures)."""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tplus_dist.config import ConfigError, ModelConfig, RunConfig, load_config
from tplus_dist.model import build_model
from tplus_dist.train.metrics import device_peak_flops


class _RefBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, bias: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.mlp_proj = nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, s, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """Karpathy's nanoGPT model (fused QKV, SDPA, LayerNorm, GELU, learned positions, tied head)."""

    def __init__(self, vocab: int, seq_len: int, d: int, n_layers: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d)
        self.h = nn.ModuleList(_RefBlock(d, n_heads, bias) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def reference_flops_per_token(vocab: int, d: int, n_layers: int, seq_len: int) -> float:
    n = n_layers * 12 * d * d + vocab * d
    return 6.0 * n + 12.0 * n_layers * d * seq_len


def _time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n


def _fwd_bwd(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None,
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Callable:
    """One forward+backward step: the forward under ``context()`` when given (the te rows: the trainer's
    precision_context, bf16 autocast and TE's FP8 autocast), else under autocast to ``dtype`` (None: fp32)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if context is not None:
            ctx = context()
        elif dtype is not None:
            ctx = torch.autocast(tokens.device.type, dtype=dtype)
        else:
            ctx = torch.autocast("cpu", enabled=False)
        with ctx:
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()

    return step


def run_bench(
    mcfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    steps: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype | None,
    compile: bool = False,
) -> dict[str, float]:
    torch.manual_seed(0)
    ours = build_model(mcfg).to(device)
    ref = NanoGPT(mcfg.padded_vocab_size, mcfg.seq_len, mcfg.d_model, mcfg.n_layers, mcfg.n_heads).to(device)
    if compile:
        ours = torch.compile(ours)  # type: ignore[assignment]
        ref = torch.compile(ref)  # type: ignore[assignment]
    tokens = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=device)
    targets = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=device)
    step_ours = _fwd_bwd(ours, tokens, targets, dtype)
    step_ref = _fwd_bwd(ref, tokens, targets, dtype)
    for _ in range(2):  # warm-up: allocator, kernels, compile
        step_ours()
        step_ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):  # interleaved, so drift affects both alike
        t_ours.append(_time_steps(step_ours, steps, device))
        t_ref.append(_time_steps(step_ref, steps, device))
    n_tok = batch_size * seq_len
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    f_ours = ours.flops_per_token(seq_len) if hasattr(ours, "flops_per_token") else math.nan
    f_ref = reference_flops_per_token(mcfg.padded_vocab_size, mcfg.d_model, mcfg.n_layers, seq_len)
    return {
        "ours_tokens_per_s": n_tok / mo,
        "ref_tokens_per_s": n_tok / mr,
        "time_ratio": mo / mr,
        "ours_tflops": n_tok / mo * f_ours / 1e12,
        "ref_tflops": n_tok / mr * f_ref / 1e12,
        "ours_step_s": mo,
        "ref_step_s": mr,
        "ours_spread": (max(t_ours) - min(t_ours)) / mo,
        "ref_spread": (max(t_ref) - min(t_ref)) / mr,
    }


PROVIDERS = (
    "torch-eager",
    "torch-compile",
    "nanogpt-eager",
    "nanogpt-compile",
    "te-bf16",
    "te-fp8-delayed",
    "te-fp8-current",
    "te-fp8-block",
)
"""What the matrix mode measures: our decoder eager or compiled, the nanoGPT reference of the same shape, and
Transformer Engine (bf16, FP8 recipes)."""


def provider_overrides(provider: str) -> list[str]:
    """The ``--section.key=value`` overrides a benchmark row loads its preset with: the te rows build the decoder with
    ``model.provider=te`` in bf16 autocast and their FP8 recipe (``precision.fp8``), the others the preset as it is.
    `make gpu-check --dry-run` validates these with the real loader."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: not one of {', '.join(PROVIDERS)}")
    if not provider.startswith("te-"):
        return []
    fp8 = provider.removeprefix("te-fp8-") if provider.startswith("te-fp8-") else "none"
    return ["--model.provider=te", "--precision.dtype=bf16", f"--precision.fp8={fp8}"]


def _unavailable(provider: str, device: torch.device, run: RunConfig | None = None) -> str | None:
    """Why this row cannot be measured here (None: it can): the te rows need Transformer Engine and a CUDA device
    (te_unavailable_reason), and an FP8 recipe a GPU that runs it (precision.precheck's one sentence)."""
    if not provider.startswith("te-"):
        return None
    from tplus_dist.backends.te_provider import te_unavailable_reason

    why = te_unavailable_reason(device)
    if why is None and run is not None:
        from tplus_dist.precision import precheck

        try:
            precheck(run, device)
        except ConfigError as e:
            why = str(e)
    return why


def _peak_memory(device: torch.device) -> float:
    """GB: CUDA's peak allocation, or the process's peak resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure_one(
    mcfg: ModelConfig,
    provider: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype | None,
    run: RunConfig | None = None,
) -> dict[str, object]:
    """One configuration, in this process: tokens/s (median of repeats), TFLOP/s, MFU against the bf16 peak
    (also under FP8, so rows compare) and peak memory. The te rows need ``run`` (the preset loaded with
    :func:`provider_overrides`): its precision section is the trainer's (precision_context, keep_layers_in_bf16).
    A row that cannot run here returns ``{"provider", "unavailable": why}``."""
    why = _unavailable(provider, device, run)
    if why:
        return {"provider": provider, "unavailable": why}
    torch.manual_seed(0)
    context = None
    if provider.startswith("te-"):
        if run is None:
            raise ValueError(f"the {provider} row needs the run config (its precision section)")
        from tplus_dist.backends.te_provider import TEProvider
        from tplus_dist.model.decoder import model_flops_per_token
        from tplus_dist.precision import keep_layers_in_bf16, precision_context

        # The trainer's build: fp32 master parameters (TE casts them under autocast), the te layers.
        model: nn.Module = build_model(mcfg, TEProvider(None, device=device, params_dtype=torch.float32))
        keep_layers_in_bf16(model, run.precision, mcfg.n_layers)
        precision = run.precision
        context = lambda: precision_context(precision, device)
        flops = model_flops_per_token(mcfg, seq_len)
    elif provider.startswith("nanogpt"):
        model = NanoGPT(mcfg.padded_vocab_size, mcfg.seq_len, mcfg.d_model, mcfg.n_layers, mcfg.n_heads)
        flops = reference_flops_per_token(mcfg.padded_vocab_size, mcfg.d_model, mcfg.n_layers, seq_len)
    else:
        model = build_model(mcfg)
        from tplus_dist.model.decoder import model_flops_per_token

        flops = model_flops_per_token(mcfg, seq_len)
    model = model.to(device)
    if provider.endswith("-compile"):
        model = torch.compile(model)  # type: ignore[assignment]
    tokens = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=device)
    targets = torch.randint(0, mcfg.vocab_size, (batch_size, seq_len), device=device)
    step = _fwd_bwd(model, tokens, targets, dtype, context)
    for _ in range(2):  # warm-up: allocator, kernels, compilation (and FP8's first scaling factors)
        step()
    times = [_time_steps(step, steps, device) for _ in range(repeats)]
    med = statistics.median(times)
    tps = batch_size * seq_len / med
    peak = device_peak_flops(device)
    return {
        "provider": provider,
        "tokens_per_s": tps,
        "step_s": med,
        "tflops": tps * flops / 1e12,
        "mfu": tps * flops / peak if peak else None,
        "peak_memory_gb": _peak_memory(device),
        "spread": (max(times) - min(times)) / med,
    }


def run_matrix(models: list[str], providers: list[str], passthrough: list[str]) -> list[dict[str, object]]:
    """Each (model, provider) in its own process (a fresh allocator, compile cache and peak-memory count), one
    after the other; returns their result rows."""
    import json
    import subprocess
    import sys

    rows = []
    for model in models:
        for provider in providers:
            cmd = [sys.executable, "-m", "tplus_dist", "bench", "--model", model, "--provider", provider, "--json",
                   *passthrough]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                row: dict[str, object] = {"provider": provider, "unavailable": f"failed: {tail}"}
            else:
                row = json.loads(lines[-1])
            row["model"] = model
            rows.append(row)
            print(_row_text(row), flush=True)
    return rows


_HEADER = f"{'model':<14}{'provider':<17}{'tokens/s':>12}{'step s':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}"


def _row_text(row: dict[str, object]) -> str:
    head = f"{row['model']!s:<14}{row['provider']!s:<17}"
    if "unavailable" in row:
        return f"{head}unavailable: {row['unavailable']}"
    mfu = row["mfu"]
    mfu_text = f"{100 * mfu:.1f}%" if isinstance(mfu, float) else "-"
    return (
        f"{head}{float(row['tokens_per_s']):>12,.0f}{float(row['step_s']):>9.3f}"  # type: ignore[arg-type]
        f"{float(row['tflops']):>9.3f}{mfu_text:>7}{float(row['peak_memory_gb']):>9.2f}"  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tplus bench", description=__doc__)
    ap.add_argument("--model", default="gpt2-124m", help="preset name in configs/models or a YAML path")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 8 on GPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, the preset's on GPU")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's depth (a quicker CPU run)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--provider",
        default=None,
        help="comma-separated, one process per (model, provider), a table at the end: " + ", ".join(PROVIDERS),
    )
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one configuration as a JSON line
    args, overrides = ap.parse_known_args(argv)
    models = args.model.split(",")
    if args.provider is not None:
        providers = args.provider.split(",")
        bad = [p for p in providers if p not in PROVIDERS]
        if bad:
            raise ValueError(f"--provider {','.join(bad)}: not one of {', '.join(PROVIDERS)}")
        if len(models) > 1 or len(providers) > 1 or not args.json:
            passthrough = _drop_values(argv or [], ("--model", "--provider"))
            print(_HEADER, flush=True)
            rows = run_matrix(models, providers, passthrough)  # prints each row as it finishes: the table, once
            _print_context(rows, args)
            return 0
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    path = args.model if args.model.endswith((".yaml", ".yml")) else f"models/{args.model}.yaml"
    extra = [f"--model.n_layers={args.n_layers}"] if args.n_layers else []
    if args.provider is not None:
        extra += provider_overrides(args.provider)
    run = load_config(path, extra + overrides)
    mcfg = run.model
    seq = args.seq_len or (256 if device.type == "cpu" else mcfg.seq_len)
    bs = args.batch_size or (4 if device.type == "cpu" else 8)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda" else None}[
        args.dtype
    ]
    if args.json:
        import json

        one = measure_one(mcfg, args.provider, bs, seq, args.steps, args.repeats, device, dtype, run)
        print(json.dumps({**one, "batch": bs, "seq": seq, "dtype": str(dtype or torch.float32)}), flush=True)
        return 0
    r = run_bench(mcfg, bs, seq, args.steps, args.repeats, device, dtype, args.compile)
    peak = device_peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device {name}; torch {torch.__version__}; model {args.model} (n_layers {mcfg.n_layers}, d_model "
        f"{mcfg.d_model}); batch {bs} x seq {seq}; dtype {dtype or torch.float32}; "
        f"median of {args.repeats} x {args.steps} steps"
    )
    print(f"{'':22}{'tokens/s':>12}{'step s':>10}{'TFLOP/s':>10}{'MFU':>8}{'spread':>8}")
    for key, label in (("ours", "tplus decoder"), ("ref", "nanoGPT reference")):
        tf = r[f"{key}_tflops"]
        mfu = f"{100 * tf * 1e12 / peak:.1f}%" if peak else "-"
        print(
            f"{label:22}{r[f'{key}_tokens_per_s']:>12,.0f}{r[f'{key}_step_s']:>10.3f}{tf:>10.3f}{mfu:>8}"
            f"{100 * r[f'{key}_spread']:>7.1f}%"
        )
    print(f"time ratio (tplus / reference): {r['time_ratio']:.3f}")
    return 0


def _drop_values(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """argv without ``--key value`` / ``--key=value`` for the given keys."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=")[0]
        if key in keys:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _print_context(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    """The line under the table that says where and how it was measured (the rows were printed as they came: printing
    them again here showed the table twice)."""
    device = "cuda" if torch.cuda.is_available() and args.device in ("auto", "cuda") else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    first = next((r for r in rows if "unavailable" not in r), None)
    shape = f"batch {first['batch']} x seq {first['seq']}, {first['dtype']}" if first else ""
    print(f"{time.strftime('%Y-%m-%d')}; device {name}; torch {torch.__version__}; {shape}; median of "
          f"{args.repeats} x {args.steps} steps; MFU against the bf16 dense peak (also for FP8 rows)")  # fmt: skip
