"""`tplus plan`: predicted per-GPU memory of a run before it starts, and a search over layouts that fit.

A pure memory model (no torch.distributed, no allocation): the parameter shapes come from the real decoder built on
the meta device with a shape-only layer provider that splits exactly as the megatron provider does; the optimizer
states from each optimizer's own state shapes; the DeepSpeed parts from the config `parallel/engine.py` generates and
DeepSpeed 0.19.8's allocation code; the activations from a list of every tensor the decoder's forward saves for
backward (:func:`layer_saved_tensors`), checked against autograd's saved tensors on CPU.

Sources
-------
* ZeRO (Rajbhandari et al., arXiv 1910.02054, section 3 and figure 1): with mixed precision Adam a parameter costs
  2 (bf16 weight) + 2 (bf16 gradient) + K bytes of optimizer state, K = 12 (fp32 master weight, momentum, variance);
  stage 1 divides K by the data-parallel size N_d, stage 2 also the gradient, stage 3 also the weight. Here every
  term is the allocation DeepSpeed really makes for our generated config (see :func:`state_bytes`), which differs
  from the paper in places (fp32 gradient accumulation under bf16, a full-size gradient buffer under ZeRO 1).
* Activations (Korthikanti et al., arXiv 2205.05198, section 4, equations 1-5): per layer of a GPT block
  s*b*h*(34 + 5*a*s/h) bytes in 16-bit training without parallelism, s*b*h*(10 + 24/t + 5*a*s/(h*t)) with tensor
  parallelism t, s*b*h/t*(34 + 5*a*s/h) with sequence parallelism, s*b*h/t*34 with selective recompute of the
  attention core, and 2*s*b*h (only the input) with full recompute; the first pipeline stage of 1F1B holds p
  micro-batches (section 4.2.3), the interleaved schedule p*(1 + (p-1)/(p*m)). :func:`korthikanti_layer_bytes` is
  that formula, used as a cross-check; the prediction itself counts the tensors our block really saves.
* In-flight micro-batches: Megatron-LM core/pipeline_parallel/schedules.py: plain 1F1B warms up
  ``pp - rank - 1`` micro-batches before its first backward (so rank i holds min(pp - i, m)); the interleaved
  schedule ``(pp - rank - 1) * 2 + (v - 1) * pp`` chunk-forwards, plus the one in flight.
* Pipeline bubble: Narayanan et al., arXiv 2104.04473, section 2.2: (p - 1) / (m * v) of the ideal time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tplus_dist.config.base import ConfigError, check

if TYPE_CHECKING:
    from torch import nn

    from tplus_dist.config.model import ModelConfig
    from tplus_dist.config.run import RunConfig

RECOMPUTE_MODULES = ("core_attn", "mlp_act", "layernorm")

# ----------------------------------------------------------------------------------------------- parsing sizes

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}  # fmt: skip


def parse_bytes(text: str, name: str = "--gpu-memory") -> int:
    """'80GiB', '141GB', '80 gib', '1e9B' -> bytes (int). Decimal units (kB, MB, GB, TB) are powers of 1000, binary
    ones (KiB, MiB, GiB, TiB) of 1024. A bare number ('80') is refused: read as bytes it would silently plan for an
    80-byte GPU. Raises ConfigError naming ``name`` for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            name,
            f"{text!r} is not a size: write a number with a unit, like 80GiB or 141GB (B, kB, MB, GB, TB, KiB, MiB, "
            "GiB, TiB)",
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    check(value > 0, name, f"({text}) must be positive")
    return int(value)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """One way to run the config on ``world`` GPUs: the parallel sizes, ZeRO stage, micro-batch and recompute mode
    (Megatron-core's names: recompute_granularity none | full | selective; for full, method uniform | block and
    num_layers; for selective, the modules)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ("core_attn",)
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def from_config(cls, cfg: RunConfig, world: int) -> Layout:
        """The config's layout on ``world`` ranks (ConfigError naming parallel.tensor_parallel or
        pipeline_parallel when TP x PP does not divide it). Recompute fields are read with getattr: they belong to
        ParallelConfig once the recompute work lands, and default to none until then."""
        p = cfg.parallel
        tp, pp = p.tensor_parallel, p.pipeline_parallel
        if world % (tp * pp):
            field_name = "parallel.tensor_parallel" if world % tp else "parallel.pipeline_parallel"
            raise ConfigError(
                field_name,
                f"tensor_parallel {tp} x pipeline_parallel {pp} does not divide the {world} GPUs (--nodes x "
                "--gpus-per-node): the data-parallel size is GPUs / (tensor_parallel x pipeline_parallel)",
            )
        granularity = getattr(p, "recompute_granularity", "none")
        method = getattr(p, "recompute_method", None)
        layers = getattr(p, "recompute_num_layers", None)
        modules = tuple(getattr(p, "recompute_modules", None) or ("core_attn",))
        return cls(
            tp=tp,
            pp=pp,
            dp=world // (tp * pp),
            vpp=p.virtual_pipeline_stages or 1,
            zero_stage=p.zero_stage,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum,
            recompute=granularity,
            recompute_method=method if granularity == "full" else None,
            # full's defaults as ParallelConfig.recompute_plan fills them: uniform 1; block None = every layer of the
            # stage (virtual chunk), as train/recompute.py applies it
            recompute_num_layers=(layers if layers is not None or method == "block" else 1)
            if granularity == "full"
            else None,
            recompute_modules=modules,
            sequence_parallel=p.sequence_parallel,
        )

    def describe(self) -> str:
        rc = self.recompute
        if rc == "full":
            rc = f"full {self.recompute_method or 'uniform'} {self.recompute_num_layers or 'all'}"
        elif rc == "selective":
            rc = "selective " + "+".join(self.recompute_modules)
        vpp = f" vpp {self.vpp}" if self.vpp > 1 else ""
        sp = " sp" if self.sequence_parallel else ""
        if self.world == 1:
            return f"one process, micro-batch {self.micro_batch_size} x {self.grad_accum}, recompute {rc}"
        return (
            f"tp {self.tp}{sp} x pp {self.pp}{vpp} x dp {self.dp}, ZeRO {self.zero_stage}, micro-batch "
            f"{self.micro_batch_size} x {self.grad_accum}, recompute {rc}"
        )


# ----------------------------------------------------------------------------------------------- parameters


class _ShapeProvider:
    """A layer provider that builds this tensor-parallel rank's shapes the way MegatronProvider does (column and
    vocabulary linears split their output rows, row linears their input columns with the bias whole, a replicated
    linear whole, a split norm its features, the T5 head table its heads); used on the meta device only."""

    name = "shapes"

    def __init__(self, tp: int) -> None:
        self.tp_size, self.tp_rank = tp, 0

    def linear(self, in_features: int, out_features: int, *, bias: bool, role: str) -> nn.Module:
        import torch
        from torch import nn

        t = self.tp_size
        if role in ("column", "vocab"):
            return nn.Linear(in_features, out_features // t, bias=bias)
        if role == "row":
            m = nn.Linear(in_features // t, out_features, bias=False)
            if bias:
                m.bias = nn.Parameter(torch.empty(out_features))
            return m
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(
        self, kind: Any, dim: int, *, eps: float, bias: bool, unit_offset: bool, per_head: bool = False,
        split: bool = False,
    ) -> nn.Module:  # fmt: skip
        from tplus_dist.model.norms import build_norm

        return build_norm(kind, dim // self.tp_size if split else dim, eps=eps, bias=bias, unit_offset=unit_offset)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        from torch import nn

        return nn.Embedding(num_embeddings // self.tp_size, dim)

    def head_table(self, rows: int, n_heads: int) -> nn.Parameter:
        import torch
        from torch import nn

        return nn.Parameter(torch.empty(rows, n_heads // self.tp_size))

    def across_heads(self) -> None:
        return None

    def attention_core(self, cfg: ModelConfig, layer: int) -> nn.Module:
        from tplus_dist.model.attention import AttentionCore

        return AttentionCore(cfg, layer, heads=range(cfg.n_heads // self.tp_size))

    def logits(self, *args: Any) -> Any:  # pragma: no cover - shapes only
        raise NotImplementedError

    def lm_loss(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - shapes only
        raise NotImplementedError


def stage_parts(cfg: ModelConfig, layout: Layout, stage: int) -> list[nn.Module]:
    """The decoder parts pipeline rank ``stage`` builds, on the meta device, with one tensor-parallel rank's shapes:
    the whole decoder (pp 1); DeepSpeed's pipeline stages (parallel/pipeline.py: the embedding part on the first,
    the blocks evenly, the head part and, for tied embeddings, the embedding part again on the last); or the
    interleaved chunks (parallel/interleaved.py: chunk c * pp + stage of pp * vpp, the embedding on chunk 0, the head
    and a tied copy of the embedding on the last)."""
    import torch

    from tplus_dist.model.decoder import Decoder

    provider: Any = _ShapeProvider(layout.tp)
    L, pp = cfg.n_layers, layout.pp
    with torch.device("meta"):
        if pp == 1:
            return [Decoder(cfg, provider, init_seed=0)]
        if layout.vpp > 1:
            n = pp * layout.vpp
            per = L // n
            return [
                Decoder(cfg, provider, layers=range(s * per, (s + 1) * per), embed=s == 0, head=s == n - 1,
                        tied_output=True, init_seed=0)
                for s in (c * pp + stage for c in range(layout.vpp))
            ]  # fmt: skip
        per = L // pp
        parts: list[nn.Module] = []
        if stage == 0:
            parts.append(Decoder(cfg, provider, layers=(), embed=True, head=False, init_seed=0))
        parts.append(Decoder(cfg, provider, layers=range(stage * per, (stage + 1) * per), embed=False, head=False,
                             init_seed=0))  # fmt: skip
        if stage == pp - 1:
            parts.append(Decoder(cfg, provider, layers=(), embed=False, head=True, init_seed=0))
            if cfg.tie_embeddings:
                parts.append(Decoder(cfg, provider, layers=(), embed=True, head=False, init_seed=0))
        return parts


_PARAMS_CACHE: dict[tuple[str, int, int, int, int], list[tuple[str, Any]]] = {}


def stage_parameters(cfg: ModelConfig, layout: Layout, stage: int) -> list[tuple[str, Any]]:
    """(name, meta parameter) of pipeline rank ``stage`` (one tensor-parallel rank), each tensor once (cached per
    model and split: a search asks for the same shapes many times)."""
    key = (repr(cfg), layout.tp, layout.pp, layout.vpp, stage)
    if key not in _PARAMS_CACHE:
        _PARAMS_CACHE[key] = _stage_parameters(cfg, layout, stage)
    return _PARAMS_CACHE[key]


def _stage_parameters(cfg: ModelConfig, layout: Layout, stage: int) -> list[tuple[str, Any]]:
    seen: set[int] = set()
    out = []
    for part in stage_parts(cfg, layout, stage):
        for name, p in part.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


# ----------------------------------------------------------------------------------------------- states


@dataclass
class StateBytes:
    """Bytes one rank holds for the weights and their training state (exact allocations; see state_bytes)."""

    params: int = 0
    grads: int = 0
    master: int = 0
    """fp32 master weights DeepSpeed keeps besides the model's (ZeRO 1-3, its bf16 optimizer)."""
    optimizer: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def optimizer_state_bytes(cfg: RunConfig, shapes: list[tuple[int, ...]], itemsize: int = 4) -> int:
    """Bytes of ``optim.name``'s state for parameters of these shapes, each element ``itemsize`` bytes where the
    state follows the parameter's dtype, from the optimizers' own code:

    * adamw (torch.optim.AdamW): exp_avg and exp_avg_sq like the parameter, and ``step``, a float32 0-d tensor
      (torch/optim/adam.py _init_group: ``torch.tensor(0.0, dtype=_get_scalar_dtype())``), per tensor.
    * adafactor (optim/adafactor.py _init_state): fp32 row [..., n] and column [..., m] statistics for a matrix (with
      adafactor_factored), else a full fp32 v; an fp32 momentum m with adafactor_momentum; step is a Python int.
    * soap (optim/soap.py): fp32 exp_avg and exp_avg_sq, and for a matrix each dimension n <= soap_max_precond_dim its
      n x n statistic L and, from the first refresh on, its n x n eigenbasis Q (both counted: the steady state).
    * scaled_adam (optim/scaled_adam.py): exp_avg_sq and delta like the parameter (fp32 at least), and a 0-d
      scale_exp_avg_sq for tensors of more than one element."""
    o = cfg.optim
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if o.name == "adamw":
            total += 2 * n * itemsize + 4
        elif o.name == "adafactor":
            if o.adafactor_factored and len(shape) >= 2:
                total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += 4 * n
            if o.adafactor_momentum is not None:
                total += 4 * n
        elif o.name == "soap":
            total += 8 * n
            if len(shape) >= 2:
                total += sum(2 * 4 * d * d for d in shape if d <= o.soap_max_precond_dim)
        elif o.name == "scaled_adam":
            size = max(itemsize, 4)
            total += 2 * n * size + (size if n > 1 else 0)
        else:  # pragma: no cover - validated by OptimConfig
            raise ValueError(f"unknown optimizer {o.name!r}")
    return total


def _groups(cfg: RunConfig, params: list[tuple[str, Any]]) -> list[list[int]]:
    """Element counts of each optimizer parameter group (optim/param_groups.py: per kind, in KINDS order)."""
    from tplus_dist.model.decoder import parameter_kind
    from tplus_dist.optim.param_groups import KINDS

    by_kind: dict[str, list[int]] = {k: [] for k in KINDS}
    for name, p in params:
        by_kind[parameter_kind(name, p)].append(p.numel())
    return [v for k, v in by_kind.items() if v]


def bf16_training(cfg: RunConfig, device: str = "cuda") -> bool:
    """precision.dtype resolved for ``device`` (auto: bf16 on a GPU, fp32 on CPU), as parallel/engine.use_bf16."""
    return cfg.precision.dtype == "bf16" or (cfg.precision.dtype == "auto" and device == "cuda")


def state_bytes(cfg: RunConfig, layout: Layout, stage: int, device: str = "cuda") -> StateBytes:
    """Parameters, gradients, master weights and optimizer states one rank of pipeline stage ``stage`` allocates.

    One process (layout.world 1): the fp32 model, its fp32 gradients, the optimizer over them (no DeepSpeed; bf16
    is autocast only). Several: DeepSpeed 0.19.8 with the config parallel/engine.deepspeed_config writes, in which
    bf16 casts the model to bf16 and sets data_types.grad_accum_dtype fp32 for ZeRO 1-3. DeepSpeed flattens each
    optimizer parameter group into one buffer padded to a multiple of 2 x dp elements (stage_1_and_2.py
    ``nccl_start_alignment_factor * dp``; bf16_optimizer.py the same), and the client optimizer steps the flat fp32
    partition of 1/dp of it (so AdamW keeps 2 states of that size and one step tensor per group):

    ========  =====  ======================  ==============================  =================  =================
    ZeRO      dtype  weights                 gradients                       master (fp32)      AdamW states
    ========  =====  ======================  ==============================  =================  =================
    0         fp32   4 P                     4 P                             -                  8 P + 4/tensor
    0         bf16   2 P                     2 P (DDP_BFLOAT16, pp 1)        -                  4 P + 4/tensor
    0 pp>1    bf16   2 F                     2 F (BF16_Optimizer)            4 F/dp             8 F/dp + 4/group
    1         fp32   4 F                     4 P (p.grad) + 4 F/dp           4 F/dp (a clone)   8 F/dp + 4/group
    1         bf16   2 F                     4 F (BF16_Optimizer, fp32)      4 F/dp             8 F/dp + 4/group
    2         any    2|4 F                   4 F/dp                          4 F/dp             8 F/dp + 4/group
    3         any    2|4 (F3 + persistent)   4 F3                            4 F3               8 F3 + 4/group
    ========  =====  ======================  ==============================  =================  =================

    P: this rank's parameter elements; F: P padded per group; F3: ZeRO 3's per-parameter partitions ceil(n/dp)
    summed; persistent: the elements of parameters at most param_persistence_threshold (kept whole too). Only
    adamw runs with ZeRO 1-3 or tensor parallelism (train/run.setup_layout refuses the others there)."""
    params = stage_parameters(cfg.model, layout, stage)
    shapes = [tuple(p.shape) for _, p in params]
    P = sum(math.prod(s) for s in shapes)
    out = StateBytes()
    if layout.world == 1:
        out.params = out.grads = 4 * P
        out.optimizer = optimizer_state_bytes(cfg, shapes, 4)
        out.notes.append("one process: fp32 weights, gradients and optimizer (no DeepSpeed)")
        return out
    bf16 = bf16_training(cfg, device)
    w = 2 if bf16 else 4
    dp, z = layout.dp, layout.zero_stage
    align = 2 * dp
    groups = _groups(cfg, params)
    flat = sum(math.ceil(sum(g) / align) * align for g in groups)
    part = flat // dp
    adam_part = 2 * 4 * part + 4 * len(groups)
    if z == 0:
        if not bf16:
            out.params = out.grads = 4 * P
            out.optimizer = optimizer_state_bytes(cfg, shapes, 4)
        elif layout.pp == 1:
            out.params = out.grads = 2 * P
            out.optimizer = optimizer_state_bytes(cfg, shapes, 2)
            out.notes.append(
                "bf16 ZeRO 0: DeepSpeed's DDP_BFLOAT16 steps the bf16 weights with bf16 optimizer states (no fp32 "
                "master: updates smaller than bf16's precision are lost); parallel.zero_stage 1 keeps an fp32 master"
            )
        else:
            out.params, out.grads, out.master, out.optimizer = 2 * flat, 2 * flat, 4 * part, adam_part
    elif z == 1:
        out.params, out.master, out.optimizer = w * flat, 4 * part, adam_part
        out.grads = 4 * flat if bf16 else 4 * P + 4 * part
    elif z == 2:
        out.params, out.grads, out.master, out.optimizer = w * flat, 4 * part, 4 * part, adam_part
    else:
        part3 = sum(math.ceil(math.prod(s) / dp) for s in shapes)
        # stage3.py: each parameter's ds_tensor is ceil(numel / dp) elements of one flat low-precision buffer, and the
        # fp32 groups flat over them; a parameter of at most param_persistence_threshold elements (default 1e5) also
        # stays whole on every rank (partition_parameters.py: ds_persist), the others are gathered while used
        threshold = _zero3_persistence(cfg, layout, device)
        persistent = sum(math.prod(s) for s in shapes if math.prod(s) <= threshold)
        out.params = w * (part3 + persistent)
        out.grads = out.master = 4 * part3
        out.optimizer = 2 * 4 * part3 + 4 * len(groups)
    return out


def _zero3_persistence(cfg: RunConfig, layout: Layout, device: str) -> int:
    """zero_optimization.param_persistence_threshold of the generated DeepSpeed config (DeepSpeed's default 1e5)."""
    from tplus_dist.parallel.engine import load_deepspeed_overrides

    zo = load_deepspeed_overrides(cfg.parallel.deepspeed_config).get("zero_optimization", {})
    return int(float(zo.get("param_persistence_threshold", 1e5)))


# ----------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Saved:
    """One tensor saved for backward: ``elements`` per micro-batch, ``itemsize`` bytes each; ``module`` the selective
    recompute module that owns it (recomputed, so not saved, when selected), ``sp`` whether sequence parallelism
    shards it over the tensor-parallel ranks."""

    what: str
    elements: int
    itemsize: int
    module: str | None = None
    sp: bool = False
    only_with: str | None = None
    """Saved only when this selective module is recomputed (the checkpoint keeps its input)."""

    def nbytes(self, layout: Layout) -> int:
        n = self.elements * self.itemsize
        return n // layout.tp if self.sp and layout.sequence_parallel else n


@dataclass(frozen=True)
class Dtypes:
    """Element sizes of a forward: ``resid`` the residual stream (the parameters' dtype: fp32, or bf16 under
    DeepSpeed's bf16), ``act`` the autocast dtype of matmul outputs and inputs, ``cuda`` whether fused CUDA norms run
    (F.rms_norm on CUDA saves input and rstd; the CPU composite also its normalized x)."""

    resid: int = 4
    act: int = 4
    cuda: bool = False

    @classmethod
    def of(cls, cfg: RunConfig, layout: Layout, device: str) -> Dtypes:
        bf16 = bf16_training(cfg, device)
        return cls(resid=2 if bf16 and layout.world > 1 else 4, act=2 if bf16 else 4, cuda=device == "cuda")


def _norm_saves(tag: str, rows: int, dim: int, kind: str, dt: Dtypes) -> list[Saved]:
    """A norm over ``rows`` x ``dim`` (model/norms.py: computed in fp32): its fp32 input (the upcast copy when the
    stream is bf16; the stream itself in fp32), and per kind rmsnorm: rstd [rows] fp32, plus on CPU the normalized
    x before the gain (torch's composite rms_norm); layernorm: mean and rstd [rows] fp32 (native_layer_norm);
    biasnorm: x - b, its square's mean, rsqrt, exp(s) product (4 row-or-full tensors)."""
    if dt.resid == 4:  # the fp32 stream itself: saved whether or not the norm is recomputed (a checkpoint's input)
        out = [Saved(f"{tag} input (fp32)", rows * dim, 4, None, sp=True)]
    else:  # the upcast copy; recomputing the norm keeps its bf16 input instead
        out = [
            Saved(f"{tag} input upcast to fp32", rows * dim, 4, "layernorm", sp=True),
            Saved(f"{tag} bf16 input (kept by the recompute)", rows * dim, dt.resid, sp=True, only_with="layernorm"),
        ]
    if kind == "rmsnorm":
        out.append(Saved(f"{tag} rstd", rows, 4, "layernorm", sp=True))
        if not dt.cuda:
            out.append(Saved(f"{tag} normalized x (CPU composite)", rows * dim, 4, "layernorm", sp=True))
    elif kind == "layernorm":
        out.append(Saved(f"{tag} mean, rstd", 2 * rows, 4, "layernorm", sp=True))
    else:
        out += [
            Saved(f"{tag} x - b", rows * dim, 4, "layernorm", sp=True),
            Saved(f"{tag} rsqrt(ms + eps)", rows, 4, "layernorm", sp=True),
            Saved(f"{tag} x * rsqrt", rows * dim, 4, "layernorm", sp=True),
        ]
    return out


def layer_saved_tensors(cfg: RunConfig, layout: Layout, dt: Dtypes, layer: int = 0) -> list[Saved]:
    """Every tensor one decoder block (model/block.py, attention.py, mlp.py) saves for backward on one
    tensor-parallel rank, per micro-batch of b sequences of s tokens, in the order the forward saves them.

    Per linear: its input (the autocast copy under bf16); the weight is a parameter (not an activation). Under
    sequence parallelism a column-parallel linear (megatron's LinearWithGradAccumulationAndAsyncCommunication)
    saves this rank's part of its input and gathers it again in backward, but replicated key/value projections
    (fewer kv heads than ranks) gather it themselves and each saves the whole gathered [b*s, d]. Rotary
    saves only its cos/sin tables (buffers, shared by every layer: not counted). SDPA (flash, or torch's CPU flash
    kernel) saves q, k, v, its output and the logsumexp [b, h, s] (the output's [b, s, h, d] layout makes wo's input
    a view of it: counted once); with an additive mask (ALiBi, a window, a learned bias) the [h|1, s, s] mask too.
    The exact path (softcap, off-by-one, Shaw) materialises the scores: q and k repeated for GQA, the fp32 scores
    [b, h, s, s] and probabilities (and tanh of the cap), the bool causal mask [s, s], the probabilities again in
    the activation dtype for probs @ v, and a dropout mask. A gated MLP saves the gate output (the activation's
    input), the activation output and the up output (the product's operands) and the product (w_down's input); an
    ungated one the up output and the activation output. Dropout saves a bool mask of its input's size."""
    m = cfg.model
    b, s, tp = layout.micro_batch_size, cfg.seq_len, layout.tp
    rows, d = b * s, m.d_model
    h = m.n_heads // tp
    kv_total = m.kv_heads
    kv = kv_total // tp if kv_total % tp == 0 else 1
    dh = m.dim_head
    f = m.ffn_dim // tp
    a = dt.act
    out: list[Saved] = []
    local = m.layer_is_local(layer)
    masked = m.position == "alibi" or local or m.position == "t5_bias"
    sdpa = m.attn_softcap is None and not m.softmax_off_by_one and m.position != "shaw"
    serial = m.block != "parallel"
    placement = m.norm_placement

    def linear_in(tag: str, full: bool) -> Saved:
        # a column-parallel linear's input is the whole hidden state (sharded under SP: Megatron saves its shard)
        return Saved(f"{tag} input", rows * d, a, None, sp=full)

    def attention() -> list[Saved]:
        o: list[Saved] = []
        if m.qk_norm != "none":
            per_head = m.qk_norm_scope == "head"
            for t, heads in (("q_norm", h), ("k_norm", kv)):
                o += [
                    dataclasses.replace(x, sp=False)
                    for x in _norm_saves(t, rows * heads if per_head else rows, dh if per_head else heads * dh,
                                         m.qk_norm, dt)
                ]  # fmt: skip
        # SDPA's fused kernels: flash (no mask), or on CUDA memory-efficient (with an additive mask); torch's CPU
        # flash kernel takes a [s, s] mask (a window) but neither a per-head one (ALiBi, T5) nor dropout: those run
        # SDPA's math path there (seen with torch 2.13's saved tensors)
        head_mask = m.position in ("alibi", "t5_bias")
        fused = sdpa and (dt.cuda or not (head_mask or m.attn_dropout > 0))
        if fused:
            o += [
                Saved("q (rotated)", rows * h * dh, a),
                Saved("k (rotated)", rows * kv * dh, a),
                Saved("v", rows * kv * dh, a),
                Saved("attention output (also wo's input)", rows * h * dh, a),
                Saved("logsumexp", b * h * s, 4, "core_attn"),
            ]
            if masked:
                heads = h if m.position in ("alibi", "t5_bias") else 1
                o.append(Saved("additive mask", heads * s * s, a, "core_attn"))
            if m.attn_dropout > 0:
                o.append(Saved("attention dropout (philox seed, offset)", 2, 8, "core_attn"))
            return o
        # the scores materialised: SDPA's math path, or the exact path (softcap, off-by-one, Shaw)
        o += [
            Saved("q", rows * h * dh, a),
            Saved("k repeated to h heads", rows * h * dh, a, "core_attn"),
            Saved("v repeated to h heads", rows * h * dh, a, "core_attn"),
            # recomputing the core keeps its inputs k and v (kv heads) instead of their repeated copies
            Saved("k (recompute input)", rows * kv * dh, a, only_with="core_attn"),
            Saved("v (recompute input)", rows * kv * dh, a, only_with="core_attn"),
        ]
        if sdpa:  # math path: softmax output in the activation dtype (and, with dropout, the dropped copy)
            o.append(Saved("probabilities", b * h * s * s, a, "core_attn"))
            if m.attn_dropout > 0:
                o.append(Saved("probabilities after dropout", b * h * s * s, a, "core_attn"))
        else:
            o.append(Saved("causal mask (bool)", s * s, 1, "core_attn"))
            if m.attn_softcap is not None:
                o.append(Saved("tanh of the capped scores (fp32)", b * h * s * s, 4, "core_attn"))
            if m.softmax_off_by_one:
                o += [
                    Saved("masked scores (fp32, amax)", b * h * s * s, 4, "core_attn"),
                    Saved("exp(scores - m) (fp32)", b * h * s * s, 4, "core_attn"),
                    Saved("row maxima, denominators", 3 * b * h * s, 4, "core_attn"),
                ]
            o.append(Saved("probabilities (fp32)", b * h * s * s, 4, "core_attn"))
            if a != 4:
                o.append(Saved("probabilities in the activation dtype", b * h * s * s, a, "core_attn"))
        if m.attn_dropout > 0:
            o.append(Saved("attention dropout mask", b * h * s * s, 1 if dt.cuda else a, "core_attn"))
        o.append(Saved("attention output, made contiguous (wo's input)", rows * h * dh, a))
        return o

    def mlp() -> list[Saved]:
        if m.gated:
            return [
                Saved("gate output (activation input)", rows * f, a),
                Saved("activation output", rows * f, a, "mlp_act"),
                Saved("up output", rows * f, a),
                Saved("product (w_down's input)", rows * f, a),
            ]
        return [Saved("up output (activation input)", rows * f, a), Saved("activation output", rows * f, a)]

    def norm(tag: str) -> list[Saved]:
        return _norm_saves(tag, rows, d, m.norm, dt)

    def drop(tag: str) -> list[Saved]:
        # CUDA's fused dropout keeps a bool mask; the CPU kernel multiplies by a mask in the input's dtype
        size = 1 if dt.cuda else a
        return [Saved(f"{tag} dropout mask", rows * d, size, None, sp=True)] if m.resid_dropout > 0 else []

    pre = placement in ("pre", "sandwich")
    if pre:
        out += norm("norm1")
    out.append(linear_in("q/k/v", True))
    if layout.sequence_parallel and tp > 1 and kv_total % tp:
        # fewer kv heads than ranks: w_k and w_v are replicated linears (megatron_provider.ReplicatedLinear), each
        # gathering the whole sequence itself before its F.linear, which saves that gathered input: two [b*s, d]
        # copies, not sharded (the column-parallel w_q saves only this rank's part and gathers again in backward)
        out += [Saved(f"{t} input, gathered whole (replicated under SP)", rows * d, a) for t in ("w_k", "w_v")]
    out += attention()
    if placement in ("sandwich", "reordered"):
        out += norm("post_attn_norm")
    out += drop("attention")
    if serial:
        if placement == "post":
            out += norm("norm1 (post)")
        if pre:
            out += norm("norm2")
        out.append(linear_in("w_up/w_gate", True))
    out += mlp()
    if placement in ("sandwich", "reordered"):
        out += norm("post_mlp_norm")
    out += drop("mlp")
    if placement == "post":
        out += norm("norm2 (post)" if serial else "norm1 (post)")
    return out


def head_saved_tensors(cfg: RunConfig, layout: Layout, dt: Dtypes) -> list[Saved]:
    """The last stage's tensors: the final norm, the output projection's input, and the loss: cross entropy's fp32
    log-softmax [b*s, V] (V the real vocabulary in one process, the padded vocabulary / tp under tensor parallelism),
    the z-loss's fp32 logits, a final soft-cap's tanh, and the targets' bookkeeping."""
    m = cfg.model
    b, s = layout.micro_batch_size, cfg.seq_len
    rows = b * s
    vocab = m.vocab_size if layout.tp == 1 else m.padded_vocab_size // layout.tp
    out = _norm_saves("final norm", rows, m.d_model, m.norm, dt) if m.final_norm else []
    out.append(Saved("output projection input", rows * m.d_model, dt.act, None, sp=True))
    out.append(Saved("log-softmax (fp32)", rows * vocab, 4))
    if dt.act != 4:
        out.append(Saved("logits (activation dtype)", rows * vocab, dt.act))
    if m.z_loss > 0:
        out.append(Saved("fp32 logits (z-loss)", rows * vocab, 4))
    if m.final_logit_softcap is not None:
        out.append(Saved("final soft-cap tanh", rows * vocab, 4))
    return out


def embed_saved_tensors(cfg: RunConfig, layout: Layout, dt: Dtypes) -> list[Saved]:
    """The first stage's: token ids (int64) for the embedding's backward, an embed norm, the embedding dropout."""
    m = cfg.model
    rows = layout.micro_batch_size * cfg.seq_len
    out = [Saved("token ids (int64)", rows, 8)]
    if m.position == "learned":
        out.append(Saved("position ids (int64)", cfg.seq_len, 8))
    if m.embed_norm:
        out += _norm_saves("embed norm", rows, m.d_model, "layernorm", dt)
    if m.embed_dropout > 0:
        out.append(Saved("embedding dropout mask", rows * m.d_model, 1 if dt.cuda else dt.resid, None, sp=True))
    return out


def layer_activation_bytes(cfg: RunConfig, layout: Layout, dt: Dtypes, layer: int = 0) -> int:
    """One block's saved bytes for one micro-batch under ``layout``'s selective modules (none and full: all of
    them; full recompute is accounted per group in :func:`stage_activation_bytes`)."""
    drop = set(layout.recompute_modules) if layout.recompute == "selective" else set()
    return sum(
        t.nbytes(layout)
        for t in layer_saved_tensors(cfg, layout, dt, layer)
        if t.module not in drop and (t.only_with is None or t.only_with in drop)
    )


def stage_layers(cfg: RunConfig, layout: Layout, stage: int) -> list[list[int]]:
    """The layer indices of each chunk pipeline rank ``stage`` holds."""
    n = layout.pp * layout.vpp
    per = cfg.model.n_layers // n
    return [list(range(c * per, (c + 1) * per)) for c in (v * layout.pp + stage for v in range(layout.vpp))]


def in_flight(layout: Layout, stage: int) -> int:
    """Chunk micro-batches whose activations pipeline rank ``stage`` holds at its peak (Megatron-LM schedules.py):
    plain 1F1B min(pp - stage, m); interleaved min((pp - stage - 1) * 2 + (v - 1) * pp + 1, m * v) chunk-forwards."""
    m = layout.grad_accum
    if layout.pp == 1:
        return 1
    if layout.vpp == 1:
        return min(layout.pp - stage, m)
    return min((layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp + 1, m * layout.vpp)


@dataclass
class ActivationBytes:
    saved_per_micro_batch: int
    """Bytes saved for backward by one micro-batch's forward through this stage (what saved_tensor_bytes measures)."""
    in_flight: int
    """Micro-batches (chunk forwards, interleaved) held at once."""
    recompute_working: int
    """Bytes the backward of a recomputed group holds while it runs (its activations, recomputed)."""
    peak: int

    @property
    def total(self) -> int:
        return self.peak


def stage_activation_bytes(cfg: RunConfig, layout: Layout, stage: int, device: str = "cuda") -> ActivationBytes:
    """Saved-for-backward bytes of pipeline rank ``stage`` (one tensor-parallel rank), per micro-batch and at the
    schedule's peak. Full recompute (Megatron semantics): uniform checkpoints groups of recompute_num_layers layers,
    each keeping only its input [b, s, d] (resid dtype); block checkpoints the first recompute_num_layers layers of
    each chunk, one by one, the rest save everything. While a checkpointed group's backward runs, its activations
    exist again: one group's worth is added to the peak."""
    dt = Dtypes.of(cfg, layout, device)
    b, s, d = layout.micro_batch_size, cfg.seq_len, cfg.model.d_model
    chunks = stage_layers(cfg, layout, stage)
    boundary = b * s * d * dt.resid
    if layout.sequence_parallel:
        boundary //= layout.tp
    per_mb_chunks = []
    working = 0
    for layers in chunks:
        per = [layer_activation_bytes(cfg, layout, dt, i) for i in layers]
        if layout.recompute == "full":
            block = layout.recompute_method == "block"
            k = layout.recompute_num_layers or (len(per) if block else 1)
            if not block:
                groups = [per[i : i + k] for i in range(0, len(per), k)]
                total = boundary * len(groups)
                working = max(working, max(sum(g) for g in groups))
            else:
                total = boundary * min(k, len(per)) + sum(per[k:])
                working = max(working, max(per[:k], default=0))
        else:
            total = sum(per)
        per_mb_chunks.append(total)
    n_chunks = layout.pp * layout.vpp
    first, last = 0, n_chunks - 1
    ids = [v * layout.pp + stage for v in range(layout.vpp)]
    extra = 0
    if first in ids:
        extra += sum(t.nbytes(layout) for t in embed_saved_tensors(cfg, layout, dt) if t.only_with is None)
    if last in ids:
        extra += sum(t.nbytes(layout) for t in head_saved_tensors(cfg, layout, dt) if t.only_with is None)
    if dt.act < dt.resid:
        # autocast over fp32 weights: each matmul saves the bf16 copy of its weight (autocast's cast cache, one per
        # forward_context, i.e. per micro-batch); lookups (embeddings used as such) are not cast
        matmul = sum(
            p.numel() for name, p in stage_parameters(cfg.model, layout, stage)
            if p.ndim >= 2 and not name.startswith(("pos_embed.", "cond_embed."))
            and not (name.startswith("embed.") and not (cfg.model.tie_embeddings and last in ids))
        )  # fmt: skip
        extra += matmul * dt.act
    per_micro = sum(per_mb_chunks) + extra
    flight = in_flight(layout, stage)
    chunk_mean = sum(per_mb_chunks) / len(per_mb_chunks)
    peak = int(chunk_mean * flight) + extra + working if layout.vpp > 1 else per_micro * flight + working
    return ActivationBytes(per_micro, flight, working, peak)


def korthikanti_layer_bytes(cfg: RunConfig, layout: Layout) -> int:
    """Korthikanti et al. (arXiv 2205.05198) equations 1-5, per layer per micro-batch, 16-bit activations: the GPT
    block's s*b*h*(34 + 5*a*s/h) with tensor parallelism t (10 + 24/t + 5as/(ht)), sequence parallelism (all /t),
    selective recompute (the 5as/h term gone) and full recompute (2sbh). A cross-check, not the prediction."""
    s, b, h, a, t = cfg.seq_len, layout.micro_batch_size, cfg.model.d_model, cfg.model.n_heads, layout.tp
    attn = 0 if layout.recompute == "selective" and "core_attn" in layout.recompute_modules else 5 * a * s / h
    if layout.recompute == "full":
        return 2 * s * b * h
    if layout.sequence_parallel:
        return int(s * b * h / t * (34 + attn))
    return int(s * b * h * (10 + 24 / t + attn / t))


# ----------------------------------------------------------------------------------------------- buffers


def buffer_bytes(cfg: RunConfig, layout: Layout, stage: int, device: str = "cuda") -> tuple[int, str]:
    """DeepSpeed's communication buffers from the generated config (parallel/engine.deepspeed_config with
    parallel.deepspeed_config merged): ZeRO 1/2 reduce gradients through a bucket of reduce_bucket_size elements
    (default 5e8; stage_1_and_2.py ipg buffer, contiguous_gradients), in the gradient dtype, at most the rank's
    parameters; ZeRO 3 also prefetches up to stage3_prefetch_bucket_size elements (5e7) of gathered weights. An
    estimate of the largest such buffer alive (not exact: DeepSpeed allocates some lazily)."""
    if layout.world == 1 or (layout.dp == 1 and layout.zero_stage == 0):
        return 0, "none"
    from tplus_dist.parallel.engine import deepspeed_config, load_deepspeed_overrides

    ds = deepspeed_config(
        cfg, layout.dp, device, overrides=load_deepspeed_overrides(cfg.parallel.deepspeed_config)
    )  # fmt: skip
    zo = ds.get("zero_optimization", {})
    n = sum(p.numel() for _, p in stage_parameters(cfg.model, layout, stage))
    gsize = 4 if (ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" or not bf16_training(cfg, device)) else 2
    reduce = int(float(zo.get("reduce_bucket_size", 5e8)))
    if layout.zero_stage == 0:
        return min(reduce, n) * gsize, f"all-reduce bucket {min(reduce, n):,} elements"
    total = min(reduce, n) * gsize
    what = f"reduce bucket {min(reduce, n):,} elements"
    if layout.zero_stage == 3:
        prefetch = int(float(zo.get("stage3_prefetch_bucket_size", 5e7)))
        total += min(prefetch, n) * (2 if bf16_training(cfg, device) else 4)
        what += f" + prefetch {min(prefetch, n):,}"
    return total, what


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class StageMemory:
    stage: int
    states: StateBytes
    activations: ActivationBytes
    buffers: int
    transient: int
    """The loss's backward on the last stage: the logits' gradient [b*s, V/tp] fp32."""
    lazy_grads: bool = False
    """Gradients allocated by the backward and freed before the next step's (one process or plain DeepSpeed ZeRO 0,
    one micro-batch per step: LocalStepRunner's zero_grad(set_to_none=True)): they grow while the saved activations
    shrink, so the peak holds the larger of the two, not their sum. Otherwise (DeepSpeed's flat gradient buffers, or
    gradients accumulated over several micro-batches) both are held at once."""

    @property
    def total(self) -> int:
        s = self.states
        held = s.params + s.master + s.optimizer + self.buffers
        if self.lazy_grads:
            return held + max(self.activations.peak + self.transient, s.grads)
        return held + s.grads + self.activations.peak + self.transient


@dataclass(frozen=True)
class StepModel:
    """The step-time estimate's parameters (tplus plan's flags): peak dense TFLOP/s per GPU, the model FLOP
    utilisation assumed for the matmuls, and the bandwidths (GB/s per GPU) inside a node (tensor parallelism) and
    between nodes (data and pipeline parallelism when they leave the node)."""

    peak_tflops: float = 989.0
    mfu: float = 0.4
    intra_gbps: float = 450.0
    inter_gbps: float = 50.0


_FLOPS_CACHE: dict[tuple[str, int], float] = {}


def step_time(cfg: RunConfig, layout: Layout, model: StepModel, gpus_per_node: int, device: str = "cuda") -> float:
    """Seconds per optimizer step, estimated as

        compute = flops_per_token * tokens_per_replica / (tp * pp) * recompute factor / (peak * mfu)
                  * (1 + (pp - 1) / (m * v))                                   # the 1F1B bubble (Narayanan 2021)
        tp comm = 4 * L / pp * m all-reduces (2 forward, 2 backward; reduce-scatter + all-gather under SP, the
                  same volume) of b*s*d*act bytes, each 2 (t - 1) / t of it over the TP link
        dp comm = gradients 2 (dp - 1) / dp * P_rank * grad bytes (ZeRO 3: 3 (dp - 1) / dp, the extra weight
                  gather; ZeRO paper section 7) over the DP link, not overlapped
        pp comm = 2 (pp - 1) sends of b*s*d per micro-batch over the PP link

    flops_per_token is model_flops_per_token (6N + 12 L d s); full recompute adds one forward (x 4/3; block k of
    a chunk's layers only those k: x (1 + k / (3 x layers per chunk))), selective
    core_attn the attention scores' forward (4 L d s per token). The link is intra-node when the group fits in a node
    (tp first, then dp: megatron's rank order), else inter-node."""
    from tplus_dist.model.decoder import model_flops_per_token

    m = cfg.model
    s = cfg.seq_len
    micro, accum = layout.micro_batch_size, layout.grad_accum
    tokens = micro * accum * s
    key = (repr(m), s)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = model_flops_per_token(m, s)
    fpt = _FLOPS_CACHE[key]
    if layout.recompute == "full":
        frac = 1.0  # uniform recomputes every layer; block only the first k of each chunk (None: all of them)
        if layout.recompute_method == "block" and layout.recompute_num_layers is not None:
            per_chunk = max(1, m.n_layers // (layout.pp * layout.vpp))
            frac = min(layout.recompute_num_layers, per_chunk) / per_chunk
        fpt *= 1 + frac / 3
    elif layout.recompute == "selective" and "core_attn" in layout.recompute_modules:
        fpt += 4 * m.n_layers * m.n_heads * m.dim_head * s
    flops = fpt * tokens / (layout.tp * layout.pp)
    compute = flops / (model.peak_tflops * 1e12 * model.mfu)
    compute *= 1 + (layout.pp - 1) / (accum * layout.vpp)
    act = 2 if bf16_training(cfg, device) else 4

    def bw(group: int) -> float:
        return (model.intra_gbps if group <= gpus_per_node else model.inter_gbps) * 1e9

    tp_comm = 0.0
    if layout.tp > 1:
        vol = 4 * m.n_layers / layout.pp * accum * micro * s * m.d_model * act * 2 * (layout.tp - 1) / layout.tp
        tp_comm = vol / bw(layout.tp)
    dp_comm = 0.0
    if layout.dp > 1:
        n = max(sum(p.numel() for _, p in stage_parameters(m, layout, i)) for i in range(layout.pp))
        factor = 3 if layout.zero_stage == 3 else 2
        dp_comm = factor * (layout.dp - 1) / layout.dp * n * (4 if layout.zero_stage >= 1 else act)
        dp_comm /= bw(layout.tp * layout.dp)
    pp_comm = 0.0
    if layout.pp > 1:
        pp_comm = 2 * (layout.pp - 1) * accum * micro * s * m.d_model * act / bw(layout.world)
    return compute + tp_comm + dp_comm + pp_comm


@dataclass
class Plan:
    cfg: RunConfig
    layout: Layout
    stages: list[StageMemory]
    gpu_memory: int
    margin: float
    seconds: float | None = None

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.usable

    def one_line(self) -> str:
        p = self.peak
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"plan: {self.layout.describe()}: peak {gib(p.total)} per GPU on pipeline stage {p.stage} (weights+"
            f"grads+optimizer {gib(p.states.total)}, activations {gib(p.activations.peak)}, buffers "
            f"{gib(p.buffers + p.transient)}); {verdict} in {gib(self.usable)} ({gib(self.gpu_memory)} less "
            f"{self.margin:.0%} margin)"
        )

    def table(self) -> str:
        lines = [self.layout.describe()]
        head = f"{'stage':>5} {'params':>10} {'grads':>10} {'master':>10} {'optim':>10} {'activ':>10} "
        head += f"{'in-flight':>9} {'buffers':>10} {'total':>10}"
        lines.append(head)
        for st in self.stages:
            s = st.states
            lines.append(
                f"{st.stage:>5} {gib(s.params):>10} {gib(s.grads):>10} {gib(s.master):>10} {gib(s.optimizer):>10} "
                f"{gib(st.activations.peak):>10} {st.activations.in_flight:>9} {gib(st.buffers + st.transient):>10} "
                f"{gib(st.total):>10}"
            )
        return "\n".join(lines)


def make_plan(
    cfg: RunConfig,
    layout: Layout,
    gpu_memory: int,
    margin: float = 0.1,
    device: str = "cuda",
    step: StepModel | None = None,
    gpus_per_node: int = 8,
) -> Plan:
    """The predicted memory of every pipeline stage of ``layout`` (one tensor-parallel and data-parallel rank each:
    they are alike), and the estimated step time when ``step`` is given."""
    stages = []
    m = cfg.model
    for i in range(layout.pp):
        act = stage_activation_bytes(cfg, layout, i, device)
        buf, _ = buffer_bytes(cfg, layout, i, device)
        transient = 0
        if i == layout.pp - 1:
            vocab = m.vocab_size if layout.tp == 1 else m.padded_vocab_size // layout.tp
            transient = layout.micro_batch_size * cfg.seq_len * vocab * 4
        lazy = layout.grad_accum == 1 and (layout.world == 1 or (layout.zero_stage == 0 and not bf16_training(cfg)))
        stages.append(StageMemory(i, state_bytes(cfg, layout, i, device), act, buf, transient, lazy))
    seconds = step_time(cfg, layout, step, gpus_per_node, device) if step is not None else None
    return Plan(cfg, layout, stages, gpu_memory, margin, seconds)


def train_start_line(cfg: RunConfig, world: int, device: Any) -> str:
    """`tplus train`'s one line at the start: the plan for this run's layout on this device. On CUDA the verdict is
    against the device's memory (a layout predicted not to fit is warned about, not refused: the prediction is an
    estimate, within 10% where tested, and a run may still fit); on CPU the predicted bytes only (no memory limit to
    check against)."""
    import torch

    layout = Layout.from_config(cfg, world)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        plan = make_plan(cfg, layout, total, margin=0.0, device="cuda")
        line = "tplus: " + plan.one_line()
        if not plan.fits:
            line += "; warning: this run may run out of GPU memory (tplus plan CONFIG --search lists layouts that fit)"
        return line
    plan = make_plan(cfg, layout, 1, margin=0.0, device="cpu")
    p = plan.peak
    return (
        f"tplus: plan: {layout.describe()}: predicted peak {gib(p.total)} per process on pipeline stage {p.stage} "
        f"(weights+grads+optimizer {gib(p.states.total)}, saved activations {gib(p.activations.peak)})"
    )


def train_end_line(device: Any) -> str:
    """`tplus train`'s line at the end: the measured peak (torch.cuda.max_memory_allocated on CUDA; on CPU there is
    no allocator statistic, so it says so)."""
    import torch

    if device.type == "cuda":
        return f"tplus: measured peak GPU memory {gib(torch.cuda.max_memory_allocated(device))} (max_memory_allocated)"
    return "tplus: measured peak memory: not measured on CPU (torch keeps no allocator statistics there)"


# ----------------------------------------------------------------------------------------------- validation + search


def layout_config(cfg: RunConfig, layout: Layout) -> RunConfig:
    """``cfg`` with ``layout``'s fields set (the recompute fields only where ParallelConfig has them)."""
    par: dict[str, Any] = dict(
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        virtual_pipeline_stages=layout.vpp if layout.vpp > 1 else None,
        zero_stage=layout.zero_stage,
        sequence_parallel=layout.sequence_parallel,
    )
    names = {f.name for f in dataclasses.fields(cfg.parallel)}
    if "recompute_granularity" in names:
        par["recompute_granularity"] = layout.recompute
        par["recompute_method"] = layout.recompute_method
        par["recompute_num_layers"] = layout.recompute_num_layers
        if "recompute_modules" in names:
            par["recompute_modules"] = list(layout.recompute_modules)
    train = dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size, grad_accum=layout.grad_accum)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **par), train=train)


def check_layout(cfg: RunConfig, layout: Layout) -> None:
    """The project's own validation of ``layout`` for ``cfg`` (ParallelConfig, check_fits, ParallelDims, and the
    optimizer rule of train/run.setup_layout); raises ConfigError naming the field."""
    from tplus_dist.parallel.dims import ParallelDims

    c = layout_config(cfg, layout)
    c.parallel.validate("parallel")
    c.train.validate("train")
    ParallelDims.from_config(c.parallel, layout.world, c.model).validate()
    if layout.world > 1 and c.optim.name != "adamw":
        check(
            layout.zero_stage == 0 and layout.tp == 1 and not bf16_training(c),
            "optim.name",
            f"{c.optim.name} works on whole matrices: on {layout.world} processes it needs parallel.zero_stage 0, "
            "tensor_parallel 1 and fp32",
        )


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_layouts(cfg: RunConfig, world: int) -> Iterator[Layout]:
    """Every layout of ``world`` GPUs the project accepts: TP x PP x DP dividing it, ZeRO 0-3, sequence parallelism
    with TP > 1, recompute none / selective core_attn / full uniform 1, and micro-batches (powers of two) that keep the
    config's global batch (micro_batch_size x grad_accum x its data-parallel size on these GPUs)."""
    base = Layout.from_config(cfg, world)
    global_batch = base.micro_batch_size * base.grad_accum * base.dp
    recomputes: list[dict[str, Any]] = [
        dict(recompute="none"),
        dict(recompute="selective", recompute_modules=("core_attn",)),
        dict(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    ]
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            for micro in (x for x in _divisors(per_replica) if x & (x - 1) == 0):
                for zero in range(4):
                    for sp in (False, True) if tp > 1 else (False,):
                        for rc in recomputes:
                            layout = Layout(
                                tp=tp, pp=pp, dp=dp, vpp=1, zero_stage=zero, micro_batch_size=micro,
                                grad_accum=per_replica // micro, sequence_parallel=sp, **rc,
                            )  # fmt: skip
                            try:
                                check_layout(cfg, layout)
                            except ConfigError:
                                continue
                            yield layout


def search(
    cfg: RunConfig,
    world: int,
    gpu_memory: int,
    margin: float,
    step: StepModel,
    gpus_per_node: int,
    device: str = "cuda",
) -> tuple[list[Plan], int]:
    """The plans of every candidate layout that fits, fastest first, and how many layouts were considered."""
    fitting, n = [], 0
    for layout in candidate_layouts(cfg, world):
        n += 1
        plan = make_plan(layout_config(cfg, layout), layout, gpu_memory, margin, device, step, gpus_per_node)
        if plan.fits:
            fitting.append(plan)
    fitting.sort(key=lambda p: (p.seconds or 0.0, p.peak.total))
    return fitting, n


# ----------------------------------------------------------------------------------------------- the command

PLAN_USAGE = """tplus plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu-memory 80GiB] [--margin 0.1] [--search]
           [--top K] [--peak-tflops 989] [--mfu 0.4] [--intra-node-gbps 450] [--inter-node-gbps 50] [overrides]

Predicted per-GPU memory of the config's layout on N x G GPUs (default 1 x 8, 80GiB each, 10% kept as margin):
weights, gradients, fp32 master weights and optimizer states (as DeepSpeed allocates them for the generated config),
activations per pipeline stage (1F1B's in-flight micro-batches, the recompute mode, sequence parallelism, the
attention path) and communication buffers; exit 0 when it fits, 1 when it does not. With --search: every layout
(TP x PP x DP, ZeRO 0-3, SP, recompute, micro-batch) the project accepts on those GPUs, the fitting ones ranked by an
estimated step time (tplus_dist/plan.py step_time states the model; the flags are its parameters)."""


def main(argv: list[str]) -> int:
    """`tplus plan`; returns the exit code (0 fits, 1 does not, ConfigError for bad input, raised)."""
    from tplus_dist.cli import _split
    from tplus_dist.config import load_config

    opts: dict[str, str] = {}
    flags = {"--nodes", "--gpus-per-node", "--gpu-memory", "--margin", "--top", "--peak-tflops", "--mfu",
             "--intra-node-gbps", "--inter-node-gbps", "--device"}  # fmt: skip
    search_all, rest, i = False, [], 0
    while i < len(argv):
        a = argv[i]
        key, eq, value = a.partition("=")
        if a in ("-h", "--help"):
            print(PLAN_USAGE)
            return 0
        if a == "--search":
            search_all = True
        elif key in flags:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(key, "needs a value")
                value, i = argv[i + 1], i + 1
            opts[key] = value
        else:
            rest.append(a)
        i += 1
    config, overrides = _split(rest)
    if config is None:
        raise ConfigError("CONFIG", "tplus plan needs a CONFIG file, e.g. tplus plan configs/llama-1.1b.yaml")

    def number(name: str, default: float, kind: type = float) -> Any:
        raw = opts.get(name)
        if raw is None:
            return kind(default)
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(name, f"({raw!r}) must be a {'whole ' if kind is int else ''}number") from None
        check(value > 0 or (name == "--margin" and value == 0), name, f"must be positive, got {raw}")
        return value

    nodes, per_node = number("--nodes", 1, int), number("--gpus-per-node", 8, int)
    memory = parse_bytes(opts.get("--gpu-memory", "80GiB"))
    margin = number("--margin", 0.1)
    check(margin < 1, "--margin", f"({margin}) is the share of memory kept free: it must be below 1")
    step = StepModel(
        number("--peak-tflops", 989.0), number("--mfu", 0.4), number("--intra-node-gbps", 450.0),
        number("--inter-node-gbps", 50.0),
    )  # fmt: skip
    check(step.mfu <= 1, "--mfu", f"({step.mfu}) is a fraction of the peak: at most 1")
    top = number("--top", 10, int)  # checked before anything is printed, as every flag is
    device = opts.get("--device", "cuda")
    check(device in ("cuda", "cpu"), "--device", f"must be cuda or cpu, got {device!r}")
    cfg = load_config(config, overrides).resolved()
    world = nodes * per_node
    layout = Layout.from_config(cfg, world)  # ConfigError naming the field when the layout does not divide world
    check_layout(cfg, layout)
    plan = make_plan(cfg, layout, memory, margin, device, step, per_node)
    # a model preset (configs/models/*.yaml) sets no log.name: name it by its file rather than the default "run"
    title = cfg.log.name if cfg.log.name != "run" else Path(config).stem
    print(f"tplus plan: {title} on {nodes} x {per_node} GPUs of {gib(memory)} ({device})")
    print(plan.table())
    if world > 1:
        dtype = "bf16" if bf16_training(cfg, device) else "fp32"
        per_stage = []
        for z in range(4):
            st = state_bytes(cfg, dataclasses.replace(layout, zero_stage=z), 0, device)
            refused = " (refused with pipeline_parallel > 1)" if z >= 2 and layout.pp > 1 else ""
            per_stage.append(
                f"ZeRO {z}: {gib(st.params)} + {gib(st.grads)} + {gib(st.master)} + {gib(st.optimizer)} = "
                f"{gib(st.total)}{refused}"
            )
        print(f"stage 0's weights + gradients + fp32 master + optimizer ({dtype}, {cfg.optim.name}) by ZeRO stage:")
        print("  " + "\n  ".join(per_stage))
    for note in dict.fromkeys(n for st in plan.stages for n in st.states.notes):  # each once, in order
        print(f"note: {note}")
    if plan.seconds is not None:
        print(f"estimated step time {plan.seconds:.3f} s (tplus_dist/plan.py step_time; mfu {step.mfu})")
    print(plan.one_line())
    if search_all:
        fitting, n = search(cfg, world, memory, margin, step, per_node, device)
        print(f"\nsearch: {n} layouts the project accepts on {world} GPUs, {len(fitting)} fit; fastest first:")
        for p in fitting[:top]:
            print(f"  {p.seconds:8.3f} s  peak {gib(p.peak.total):>10}  {p.layout.describe()}")
        if not fitting:
            print("  none fits: more GPUs, more memory per GPU, or a smaller model or sequence")
    if not plan.fits:
        print(
            f"tplus plan: the config's layout does not fit: stage {plan.peak.stage} needs {gib(plan.peak.total)}, "
            f"more than {gib(plan.usable)} (--gpu-memory less the margin)",
            flush=True,
        )
        return 1
    return 0
