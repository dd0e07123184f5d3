"""Sections other than the model: optimizer, schedule, data, training loop, precision, parallel layout, logging."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tplus_dist.config.base import check, check_unused

if TYPE_CHECKING:
    from tplus_dist.config.model import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer recipe. Defaults are the GPT-3 / Llama recipe."""

    name: Literal["adamw", "adafactor", "soap", "scaled_adam"] = "adamw"
    """adamw (Loshchilov & Hutter), adafactor (Shazeer & Stern, as PaLM ran it), soap (Vyas et al. 2024), or
    scaled_adam (Zipformer's ScaledAdam: Adam steps scaled by each tensor's RMS, plus a learned scale per tensor;
    no weight decay)."""
    lr: float = 3e-4
    """Peak learning rate (under muP: the base-width rate; hidden matrices get lr / width_mult).
    Adafactor with adafactor_scale_parameter: the relative step size, multiplied by RMS(param) (PaLM: 1e-2)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """0.95 rather than 0.999: faster adaptation, fewer loss spikes at scale."""
    eps: float = 1e-8
    """Denominator epsilon of AdamW and SOAP."""
    weight_decay: float = 0.1
    """Applied to tensors of 2+ dimensions (matrices, embeddings) only; never to norms or biases.
    Decoupled: each step multiplies those tensors by (1 - lr(t) * weight_decay), lr(t) the scheduled base rate
    (under muP too, so the decay does not change with width)."""
    weight_decay_schedule: Literal["constant", "lr_squared"] = "constant"
    """lr_squared: decoupled decay of lr(t)^2 per step, PaLM's dynamic weight decay (ignores weight_decay)."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this (0 disables). The norm is logged before clipping."""
    # Adafactor (Shazeer & Stern 2018, as PaLM ran it)
    adafactor_decay_rate: float = 0.8
    """Second-moment decay 1 - t^-decay_rate."""
    adafactor_clip_threshold: float = 1.0
    """Adafactor update clipping: the update's RMS is capped at this."""
    adafactor_scale_parameter: bool = True
    """Scale the step by max(eps2, RMS(param)): parameter-scaled learning rates, as in PaLM."""
    adafactor_momentum: float | None = 0.9
    """First moment (PaLM used 0.9); None disables it and saves memory."""
    adafactor_factored: bool = True
    """Factor the second moment of matrices into row and column statistics (Shazeer & Stern);
    false keeps a full second moment (PaLM ran Adafactor unfactored)."""
    # SOAP (Vyas et al. 2024)
    soap_precondition_frequency: int = 10
    """SOAP refreshes its eigenbases every this many steps."""
    soap_shampoo_beta: float = 0.95
    """SOAP: EMA decay of the Shampoo statistics L = E[G G^T], R = E[G^T G]."""
    soap_max_precond_dim: int = 4096
    """Dimensions larger than this are not preconditioned (identity); bounds memory."""
    # ScaledAdam (Yao et al. 2023, Zipformer)
    scaled_adam_scalar_lr_scale: float = 0.1
    """ScaledAdam: the learning-rate factor of each tensor's scale and of scalar parameters."""
    scaled_adam_param_min_rms: float = 1e-5
    """ScaledAdam: a tensor's RMS is taken as at least this (and grows when below it)."""
    scaled_adam_param_max_rms: float = 3.0
    """ScaledAdam: a tensor whose RMS exceeds this is shrunk."""

    def validate(self, prefix: str = "optim") -> None:
        p = prefix + "."
        check(self.lr > 0, p + "lr", f"must be positive, got {self.lr}")
        check(all(0 <= b < 1 for b in self.betas), p + "betas", f"each must be in [0, 1), got {list(self.betas)}")
        check(self.eps > 0, p + "eps", f"must be positive, got {self.eps}")
        check(self.weight_decay >= 0, p + "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, p + "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.adafactor_decay_rate > 0, p + "adafactor_decay_rate", "must be positive")
        check(self.adafactor_clip_threshold > 0, p + "adafactor_clip_threshold", "must be positive")
        check(
            self.adafactor_momentum is None or 0 <= self.adafactor_momentum < 1,
            p + "adafactor_momentum",
            f"must be in [0, 1) or null, got {self.adafactor_momentum}",
        )
        check(self.soap_precondition_frequency > 0, p + "soap_precondition_frequency", "must be positive")
        check(self.scaled_adam_scalar_lr_scale > 0, p + "scaled_adam_scalar_lr_scale", "must be positive")
        check(
            0 < self.scaled_adam_param_min_rms < self.scaled_adam_param_max_rms,
            p + "scaled_adam_param_min_rms",
            f"must be positive and below scaled_adam_param_max_rms ({self.scaled_adam_param_max_rms})",
        )
        beta = self.soap_shampoo_beta
        check(0 <= beta < 1, p + "soap_shampoo_beta", f"must be in [0, 1), got {beta}")
        check(self.soap_max_precond_dim > 0, p + "soap_max_precond_dim", "must be positive")
        # an optimizer's own knobs, given while another optimizer is selected, would be ignored silently
        for owner in ("adafactor", "soap", "scaled_adam"):
            if self.name != owner:
                names = tuple(f for f in self.__dataclass_fields__ if f.startswith(owner + "_"))
                check_unused(
                    self, prefix, names, f"it is a setting of optimizer {owner}, and optim.name is {self.name!r}"
                )
        if self.name == "adafactor":
            check_unused(
                self, prefix, ("betas", "eps"),
                "adafactor does not read it (its moments are set by adafactor_momentum and adafactor_decay_rate)",
            )  # fmt: skip
        if self.name == "scaled_adam":
            check_unused(
                self, prefix, ("weight_decay", "weight_decay_schedule"),
                "scaled_adam applies no weight decay (each tensor's learned scale is bounded by scaled_adam_param_*)",
            )  # fmt: skip
        elif self.weight_decay_schedule == "lr_squared":
            check_unused(
                self, prefix, ("weight_decay",),
                "weight_decay_schedule lr_squared decays by lr(t)^2 each step; set weight_decay_schedule constant to "
                "use weight_decay",
            )  # fmt: skip


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, on the clock ``unit`` names: optimizer steps or tokens. A field of the other clock, or of
    another schedule, is refused (it would have no effect), and so is a warmup at least as long as the run."""

    name: Literal["cosine", "wsd", "constant", "inverse_sqrt"] = "cosine"
    """cosine: linear warmup then cosine to min_lr. wsd: warmup, stable, then decay (MiniCPM).
    constant: warmup then flat. inverse_sqrt: warmup then peak * sqrt(warmup / step) (Vaswani et al., ESPnet's
    "Noam"), not below min_lr."""
    warmup_steps: int = 100
    """unit steps: linear warmup from peak/warmup_steps to the peak optim.lr (shorter than train.steps)."""
    decay_steps: int | None = None
    """unit steps: steps from the start to the end of decay (cosine, wsd). None: train.steps."""
    min_lr: float = 1e-5
    """The floor the decay ends on."""
    unit: Literal["steps", "tokens"] = "steps"
    """The clock of warmup and decay: optimizer steps, or tokens (required with a growing batch, so that
    warmup and decay stay right as the batch grows)."""
    warmup_tokens: int = 0
    """unit tokens: linear warmup over this many tokens (fewer than the run's)."""
    decay_tokens: int | None = None
    """unit tokens: tokens from the start to the end of decay. None: the run's total tokens."""
    wsd_decay_fraction: float = 0.2
    """wsd: the last fraction of decay_steps that decays (linearly) to min_lr."""

    def validate(self, prefix: str = "schedule") -> None:
        p = prefix + "."
        check(self.warmup_steps >= 0, p + "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.decay_steps is None or self.decay_steps > 0, p + "decay_steps", "must be positive")
        check(self.min_lr >= 0, p + "min_lr", f"must be >= 0, got {self.min_lr}")
        check(self.warmup_tokens >= 0, p + "warmup_tokens", f"must be >= 0, got {self.warmup_tokens}")
        check(self.decay_tokens is None or self.decay_tokens > 0, p + "decay_tokens", "must be positive")
        check(0 < self.wsd_decay_fraction <= 1, p + "wsd_decay_fraction", "must be in (0, 1]")
        warmup, field = (
            (self.warmup_tokens, "warmup_tokens") if self.unit == "tokens" else (self.warmup_steps, "warmup_steps")
        )
        check(
            self.name != "inverse_sqrt" or warmup > 0,
            p + field,
            "must be positive for inverse_sqrt: its decay is peak * sqrt(warmup / step)",
        )
        # each clock reads its own fields: the other clock's would be accepted and ignored
        other = "steps" if self.unit == "tokens" else "tokens"
        for kind in ("warmup", "decay"):
            check_unused(
                self, prefix, (f"{kind}_{other}",),
                f"schedule.unit is {self.unit!r}, which reads schedule.{kind}_{self.unit} instead; set that, and "
                f"remove {kind}_{other} (or set it to {0 if kind == 'warmup' else 'null'})",
                off=(0, None),
            )  # fmt: skip
        decay, end = (self.decay_tokens, "decay_tokens") if self.unit == "tokens" else (self.decay_steps, "decay_steps")
        check(decay is None or decay >= warmup, p + end, f"({decay}) ends before {field} ({warmup})")
        if self.name in ("constant", "inverse_sqrt"):
            what = (
                "stays at the peak after the warmup"
                if self.name == "constant"
                else "has no end (peak * sqrt(warmup / step))"
            )
            check_unused(self, prefix, (end,), f"schedule {self.name} {what}, so there is no end of decay")
        if self.name == "constant":
            check_unused(self, prefix, ("min_lr",), "schedule constant never decays to a floor")
        if self.name != "wsd":
            check_unused(
                self,
                prefix,
                ("wsd_decay_fraction",),
                f"it is a setting of schedule wsd, and schedule.name is {self.name!r}",
            )


@dataclass
class DataConfig:
    """Training data: prepared shards (``tplus prepare``), local or remote, read in a global order."""

    shards: str | None = None
    """A directory written by `tplus prepare`, or its remote URI (s3://bucket/path; S3_ENDPOINT_URL picks a
    non-AWS endpoint). None: `source` is prepared on first use into cache_dir and reused."""
    source: str = "builtin:pydoc"
    """When shards is None: what to prepare. builtin:pydoc (Python's own documentation, ~460 KB of English
    that every Python carries), or paths/globs of .txt/.jsonl(.gz/.zst)/.parquet files."""
    tokenizer: str = "bytes"
    """When shards is None: bytes (byte-level, 256 ids + EOS), train:N (byte-level BPE of N tokens trained
    on the source), a tokenizer.json, or a tiktoken BPE file."""
    val_fraction: float = 0.05
    """When shards is None: the share of documents held out for the validation loss."""
    cache_dir: str = ".cache/tplus"
    """Local cache: shards decompressed on first use (local and remote sources; the source is only read),
    automatically prepared corpora, and the sha256 of verified files. Node-local disk is best."""
    shuffle: bool = True
    """Shuffle the sample order (per epoch, seeded); false reads the shards in order."""
    shuffle_block_shards: int = 8
    """Shuffle within blocks of this many shards (fewer shards in flight when streaming from a remote)."""
    seed: int | None = None
    """Seed of the sample order. None: train.seed."""
    num_workers: int = 0
    """DataLoader worker processes that prefetch batches (0: read in the training process)."""
    labels: bool | None = None
    """Give the model each sample's label (shards from `tplus prepare --labels`) as its condition (model.adaln).
    None: when the model is conditioned and the shards carry labels; true: required (an error if either lacks
    them); false: never (a conditioned model then trains as the plain one)."""

    def validate(self, prefix: str = "data") -> None:
        p = prefix + "."
        check(0 <= self.val_fraction < 1, p + "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer.startswith("train:"):
            n = self.tokenizer.split(":", 1)[1]
            check(n.isdigit() and int(n) > 257, p + "tokenizer", f"train:N needs an integer N > 257, got {n!r}")
        check(bool(self.source) or self.shards is not None, p + "source", "must name a corpus (or set shards)")
        check(self.shuffle_block_shards > 0, p + "shuffle_block_shards", "must be positive")
        check(self.num_workers >= 0, p + "num_workers", f"must be >= 0, got {self.num_workers}")
        if self.shards is not None:
            check_unused(
                self, prefix, ("source",),
                f"data.shards ({self.shards}) is read instead; the source is prepared only when shards is null",
            )  # fmt: skip
        if not self.shuffle:
            check_unused(
                self, prefix, ("shuffle_block_shards", "seed"),
                "data.shuffle is false, so the shards are read in order and nothing is shuffled",
            )  # fmt: skip


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum (x data-parallel)."""
    seq_len: int | None = None
    """Training sequence length. None: model.seq_len. Prepared shards must hold samples of this length."""
    batch_size_start: int | None = None
    """Growing batch: the batch (sequences per data-parallel replica, like micro_batch_size * grad_accum; the
    global batch is this x data-parallel ranks) to start from. None: no ramp, the batch is
    micro_batch_size * grad_accum per replica throughout, which is also where a ramp ends."""
    batch_size_increment: int = 0
    """Growing batch: sequences per replica added at each increase (a multiple of micro_batch_size)."""
    batch_ramp_tokens: int = 0
    """Growing batch: tokens over which the batch grows from batch_size_start to its full size."""
    seed: int = 1234
    """Seeds parameters, data order and dropout: two runs with the same seed give the same losses."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    eval_interval: int = 100
    """Steps between validation-loss evaluations (0 disables)."""
    eval_samples: int | None = None
    """Samples in the validation set: the first this many of the validation split, the same every evaluation and in
    every layout (micro-batch size, accumulation, data-parallel size, pipeline). None: the whole split. val_loss is the
    mean over every target token of these samples."""
    log_interval: int = 10
    """Steps between console lines (metrics.jsonl gets every step)."""
    compile: bool = False
    """torch.compile each decoder block in place (train/compile.py: one graph shared by the blocks, names unchanged;
    embedding, head and loss eager); on CUDA attention prefers FlashAttention. Worth it on a GPU; on a CPU the first
    step compiles for tens of seconds. Whole-block graphs with the torch provider; with the te provider graph breaks
    at TE's modules are allowed."""
    max_consecutive_skips: int = 8
    """Stop the run (exit 1, this step not saved) when this many optimizer steps in a row were skipped. A step is
    skipped, on every rank, when its loss or gradient norm is not finite, or is a spike (skip_spikes): its batch is
    consumed and the step, token and learning-rate clocks advance, but no weight or optimizer state changes. 8: the
    spike rule, with its defaults, skips up to 4 steps of a lasting jump of the loss before its window accepts it."""
    skip_spikes: bool = False
    """Also skip a step whose loss or gradient norm is more than spike_sigmas standard deviations above the mean of
    the last spike_window steps (OLMo-core's rule; acting once half the window is filled)."""
    spike_window: int = 128
    """Steps the spike rule's mean and standard deviation cover (OLMo-core's default)."""
    spike_sigmas: float = 6.0
    """Standard deviations above the window's mean that make a spike (OLMo-core's default)."""

    def validate(self, prefix: str = "train") -> None:
        p = prefix + "."
        for name in ("steps", "micro_batch_size", "grad_accum", "log_interval"):
            check(getattr(self, name) > 0, p + name, f"must be positive, got {getattr(self, name)}")
        check(
            self.eval_samples is None or self.eval_samples > 0,
            p + "eval_samples",
            f"must be positive (or left out: the whole validation split), got {self.eval_samples}",
        )
        check(self.eval_interval >= 0, p + "eval_interval", "must be >= 0 (0 disables)")
        check(self.seq_len is None or self.seq_len > 0, p + "seq_len", "must be positive")
        check(self.max_consecutive_skips > 0, p + "max_consecutive_skips", "must be positive (1: stop at the first)")
        check(self.spike_window >= 4, p + "spike_window", f"must be at least 4, got {self.spike_window}")
        check(self.spike_sigmas > 0, p + "spike_sigmas", f"must be positive, got {self.spike_sigmas}")
        if not self.skip_spikes:
            check_unused(
                self, prefix, ("spike_window", "spike_sigmas"),
                "train.skip_spikes is false, so no spike rule runs (non-finite steps are skipped without it)",
            )  # fmt: skip
        if self.eval_interval == 0:
            check_unused(self, prefix, ("eval_samples",), "train.eval_interval is 0, so there is no evaluation")
        full = self.micro_batch_size * self.grad_accum
        if self.batch_size_start is None or self.batch_size_start == full:
            check_unused(
                self, prefix, ("batch_size_increment", "batch_ramp_tokens"),
                f"the batch does not grow (train.batch_size_start is {self.batch_size_start}, the full batch "
                f"micro_batch_size * grad_accum is {full})",
            )  # fmt: skip
        if self.batch_size_start is not None:
            end = self.micro_batch_size * self.grad_accum
            m = self.micro_batch_size
            check(self.batch_size_start > 0, p + "batch_size_start", "must be positive")
            check(
                self.batch_size_start <= end,
                p + "batch_size_start",
                f"({self.batch_size_start}) is above the full batch micro_batch_size * grad_accum ({end})",
            )
            check(
                self.batch_size_start % m == 0, p + "batch_size_start", f"must be a multiple of micro_batch_size ({m})"
            )
            if self.batch_size_start < end:
                inc = self.batch_size_increment
                check(
                    inc > 0 and inc % m == 0,
                    p + "batch_size_increment",
                    f"must be a positive multiple of micro_batch_size ({m}), got {inc}",
                )
                check(
                    (end - self.batch_size_start) % inc == 0,
                    p + "batch_size_increment",
                    f"({inc}) must divide the growth {end - self.batch_size_start} "
                    f"(from batch_size_start {self.batch_size_start} to {end})",
                )
                check(self.batch_ramp_tokens > 0, p + "batch_ramp_tokens", "must be positive when the batch grows")


@dataclass
class PrecisionConfig:
    """Numerics. fp32 master weights (the optimizer's copy), with one exception: bf16 with several processes, ZeRO 0
    and no pipeline goes through DeepSpeed's DDP_BFLOAT16, which steps the bf16 weights themselves with bf16
    optimizer states (engine.py _do_optimizer_sanity_check; `tplus plan` counts it so and prints a note); use
    zero_stage 1 for fp32 master weights there. Autocast for the matmuls, and optionally FP8 GEMMs through
    Transformer Engine (model.provider te). Written against Transformer Engine 2.20.2."""

    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    fp8: Literal["none", "delayed", "current", "block"] = "none"
    """FP8 GEMMs in Transformer Engine's layers (needs model.provider te, a GPU of compute capability 8.9+, and bf16):
    delayed = TE's DelayedScaling (per-tensor scale from an amax history of earlier steps; Megatron-LM's
    --fp8-recipe delayed), current = Float8CurrentScaling (per-tensor scale from this step's amax; tensorwise),
    block = Float8BlockScaling (1x128 / 128x128 block scales, DeepSeek-V3's recipe; compute capability 9.0+ and
    CUDA 12.9+; Megatron-LM's blockwise). none: no FP8 (Megatron-LM's --fp8-format unset)."""
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    """hybrid: E4M3 in the forward pass, E5M2 (more range) for gradients; e4m3: E4M3 everywhere (TE's
    Format.HYBRID / Format.E4M3; Megatron-LM's --fp8-format). hybrid is TE's default for delayed and current
    scaling and the usual training choice."""
    fp8_amax_history_len: int = 1024
    """delayed only: steps of amax history the scale is computed from (TE DelayedScaling.amax_history_len, default
    1024; Megatron-LM's --fp8-amax-history-len)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """delayed only: the amax taken from the history: its max (robust to a dip) or the most recent value (TE
    DelayedScaling.amax_compute_algo, default max; Megatron-LM's --fp8-amax-compute-algo)."""
    fp8_margin: int = 0
    """delayed only: the scale is divided by 2^margin, headroom against growth between steps (TE
    DelayedScaling.margin, default 0; Megatron-LM's --fp8-margin)."""
    num_layers_at_start_in_bf16: int = 0
    """With fp8: the first this many decoder blocks run their GEMMs in bf16 (the early layers are the most
    sensitive to FP8 error). Megatron-LM's --num-layers-at-start-in-bf16."""
    num_layers_at_end_in_bf16: int = 0
    """With fp8: the last this many decoder blocks run in bf16. Megatron-LM's --num-layers-at-end-in-bf16."""

    def validate(self, prefix: str = "precision") -> None:
        p = prefix + "."
        check(
            self.fp8_amax_history_len >= 1,
            p + "fp8_amax_history_len",
            f"must be at least 1, got {self.fp8_amax_history_len}",
        )
        check(self.fp8_margin >= 0, p + "fp8_margin", f"must be >= 0, got {self.fp8_margin}")
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            check(getattr(self, name) >= 0, p + name, f"must be >= 0, got {getattr(self, name)}")
        if self.fp8 == "none":
            # a recipe setting given without a recipe would be ignored silently
            check_unused(
                self, prefix,
                ("fp8_format", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin",
                 "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"),
                "it is an FP8 setting, and precision.fp8 is 'none'",
                off=(0,),
            )  # fmt: skip
        elif self.fp8 != "delayed":
            # TE 2.20.2 common/recipe/__init__.py: only DelayedScaling has margin, amax_history_len and
            # amax_compute_algo; Float8CurrentScaling and Float8BlockScaling take the scale from the tensor itself
            check_unused(
                self, prefix, ("fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin"),
                f"it is a setting of delayed scaling (an amax history), and precision.fp8 {self.fp8!r} scales each "
                "tensor from its own amax",
            )  # fmt: skip


RECOMPUTE_GRANULARITIES = ("none", "full", "selective")
RECOMPUTE_MODULES = ("core_attn", "mlp_act", "layernorm")
"""parallel.recompute_modules' pieces (Megatron-core's names): the one place they are listed."""


@dataclass
class ParallelConfig:
    """Parallel layout: tensor x pipeline parallel, ZeRO stage. Data-parallel size = world size / (TP x PP)."""

    tensor_parallel: int = 1
    """Ranks that split every layer's matrices (Megatron TP); it communicates in every layer, keep it inside a node."""
    pipeline_parallel: int = 1
    """Stages the layers are cut into (contiguous blocks); only activations cross stage boundaries."""
    virtual_pipeline_stages: int | None = None
    """Layer chunks per pipeline rank: more than 1 runs the interleaved 1F1B schedule (torch.distributed.pipelining;
    a smaller bubble, more messages), null or 1 DeepSpeed's pipeline engine (plain 1F1B)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO: 0 plain data parallel; 1 shards optimizer state (no extra traffic); 2 also gradients;
    3 also parameters."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (arXiv 2205.05198) through megatron-core's layers: between the tensor-parallel
    regions (norms, dropouts, residual adds) each TP rank holds 1/tensor_parallel of the sequence, so every
    activation of the layers is split over the ranks (measured: each rank saves 1/TP of one process's layer
    activations; plain TP keeps the norms' and residual stream's whole), the all-reduces become all-gather +
    reduce-scatter (same volume). Needs tensor_parallel > 1, the sequence length divisible by it, and
    model.provider torch, and neither the interleaved schedule (virtual_pipeline_stages > 1) nor train.compile; runs
    on CPU (gloo) and GPU; checkpoints are the same as without it."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the config generated from this one (bucket sizes, overlap_comm,
    communication data types, ...). Keys this config owns (batch sizes, accumulation, ZeRO stage, clipping,
    precision, optimizer, scheduler) are refused there, naming the field to set instead."""
    distributed_timeout_minutes: float = 10.0
    """A collective (all-reduce, broadcast, pipeline send/receive...) that has not completed after this long fails,
    naming the rank and the operation, and the job ends: a rank that died or hangs cannot hang the others forever
    (Megatron's --distributed-timeout-minutes; torch's default is 30 for gloo, 10 for NCCL). Raise it when one rank
    legitimately works alone that long (a first compile, preparing a large corpus on rank 0)."""
    recompute_granularity: Literal["none", "full", "selective"] = "none"
    """Activation recompute (Megatron-core's names; README "Activation recompute"): none keeps every activation for
    backward; full keeps only the input of each checkpointed group of layers and recomputes the rest in backward
    (about one more forward of those layers); selective recomputes only the pieces in recompute_modules."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Full recompute only: uniform checkpoints the layers in groups of recompute_num_layers (each group keeps its
    input only; the default); block checkpoints the first recompute_num_layers layers of each pipeline stage (each
    virtual chunk) one by one and keeps the rest whole."""
    recompute_num_layers: int | None = None
    """Full recompute only: layers per group (uniform; default 1) or layers checkpointed per stage (block; default
    all of them); at most the layers of one pipeline stage (virtual chunk)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """Selective recompute only: the pieces recomputed in backward, from core_attn (softmax(QK^T)V with the scores,
    masks and attention dropout: the s x s tensors), mlp_act (the activation, times the gate for GLUs) and
    layernorm (every norm in the blocks)."""

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def validate(self, prefix: str = "parallel") -> None:
        """The rules that need neither the world size nor the model (those are in ParallelDims.validate)."""
        p = prefix + "."
        tp, pp, vpp = self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline_stages
        check(tp >= 1, p + "tensor_parallel", f"must be at least 1, got {tp}")
        check(pp >= 1, p + "pipeline_parallel", f"must be at least 1, got {pp}")
        check(0 <= self.zero_stage <= 3, p + "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(
            self.distributed_timeout_minutes > 0,
            p + "distributed_timeout_minutes",
            f"must be positive, got {self.distributed_timeout_minutes}",
        )
        if vpp is not None:
            check(vpp >= 1, p + "virtual_pipeline_stages", f"must be at least 1 (or null), got {vpp}")
            check(
                pp > 1,
                p + "virtual_pipeline_stages",
                f"({vpp}) interleaves pipeline stages, so it needs pipeline_parallel > 1 (got {pp}); set it to null",
            )

        check(
            not (self.sequence_parallel and vpp is not None and vpp > 1),
            p + "sequence_parallel",
            f"is not built for the interleaved pipeline schedule (virtual_pipeline_stages {vpp}): use "
            "virtual_pipeline_stages null (DeepSpeed's pipeline engine) or sequence_parallel false",
        )
        check(
            not self.sequence_parallel or tp > 1,
            p + "sequence_parallel",
            "shards activations over the tensor-parallel ranks, so it needs tensor_parallel > 1 "
            f"(got {tp}); set it to false",
        )
        check(
            not (pp > 1 and self.zero_stage >= 2),
            p + "zero_stage",
            f"ZeRO stage {self.zero_stage} cannot run with pipeline_parallel {pp}: DeepSpeed's pipeline engine "
            "supports ZeRO 0 and 1 only; use zero_stage 1",
        )
        self._validate_recompute(p)

    def _validate_recompute(self, p: str) -> None:
        g, method, k, mods = (
            self.recompute_granularity,
            self.recompute_method,
            self.recompute_num_layers,
            self.recompute_modules,
        )
        check(
            g in RECOMPUTE_GRANULARITIES,
            p + "recompute_granularity",
            f"must be one of {', '.join(RECOMPUTE_GRANULARITIES)}, got {g!r}",
        )
        check(
            method is None or method in ("uniform", "block"),
            p + "recompute_method",
            f"must be uniform, block or null, got {method!r}",
        )
        for name, value in (("recompute_method", method), ("recompute_num_layers", k)):
            check(
                value is None or g == "full",
                p + name,
                f"({value}) chooses which layers full recompute checkpoints, and recompute_granularity is {g}; "
                "set recompute_granularity full or leave it null",
            )
        check(k is None or k >= 1, p + "recompute_num_layers", f"must be at least 1 (or null), got {k}")
        check(
            mods == ["core_attn"] or g == "selective",
            p + "recompute_modules",
            f"({mods}) names the pieces selective recompute recomputes, and recompute_granularity is {g} "
            "(full recomputes whole layers); set recompute_granularity selective or leave recompute_modules unset",
        )
        bad = next((m for m in mods if m not in RECOMPUTE_MODULES), None)
        check(
            bad is None,
            p + "recompute_modules",
            f"{bad!r} is not a piece selective recompute knows; choose from {', '.join(RECOMPUTE_MODULES)}",
        )
        twice = sorted({m for m in mods if mods.count(m) > 1})
        check(not twice, p + "recompute_modules", f"names {', '.join(twice)} more than once; name each piece once")
        check(
            len(mods) > 0 or g != "selective",
            p + "recompute_modules",
            "is empty; name a piece, or set recompute_granularity none",
        )

    def recompute_plan(self) -> tuple[str, str | None, int | None, tuple[str, ...]]:
        """(granularity, method, num_layers, modules) with the defaults filled in: uniform with 1 layer per group for
        full; [core_attn] for selective; num_layers None for block means every layer of the stage."""
        g = self.recompute_granularity
        if g == "full":
            method = self.recompute_method or "uniform"
            k = (
                self.recompute_num_layers
                if self.recompute_num_layers is not None
                else (1 if method == "uniform" else None)
            )
            return g, method, k, ()
        if g == "selective":
            return g, None, None, tuple(self.recompute_modules)
        return g, None, None, ()

    def check_fits(self, model: ModelConfig, prefix: str = "parallel") -> None:
        """The model must split evenly: whole heads and vocabulary rows per TP rank, whole layers per stage."""
        p = prefix + "."
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        check(
            model.n_heads % tp == 0,
            p + "tensor_parallel",
            f"model.n_heads ({model.n_heads}) is not divisible by tensor_parallel {tp}: "
            "each tensor-parallel rank computes whole attention heads",
        )
        kv = model.kv_heads
        # Fewer kv heads than TP ranks: Megatron replicates each kv head on tp / kv ranks (MQA/GQA).
        check(
            kv % tp == 0 or tp % kv == 0,
            p + "tensor_parallel",
            f"model.n_kv_heads ({kv}) must be divisible by tensor_parallel {tp}, or divide it "
            "(then each key/value head is replicated on tensor_parallel / n_kv_heads ranks)",
        )
        vocab, m = model.padded_vocab_size, model.pad_vocab_multiple
        check(
            vocab % tp == 0,
            "model.pad_vocab_multiple",
            f"the padded vocabulary ({vocab} rows) is not divisible by tensor_parallel {tp}: "
            f"set pad_vocab_multiple to {math.lcm(m, tp)} (a multiple of both {m} and {tp})",
        )
        check(
            not (pp > 1 and model.position == "t5_bias" and model.t5_bias_shared),
            "model.t5_bias_shared",
            f"one relative-bias table shared by every layer cannot be split over pipeline_parallel {pp} stages; "
            "set model.t5_bias_shared to false (a table per layer)",
        )
        check(
            not (pp > 1 and model.adaln != "none"),
            "model.adaln",
            f"the per-sequence condition does not travel between pipeline stages yet; use pipeline_parallel 1 "
            f"(got {pp}) with adaln",
        )
        chunks = pp * (self.virtual_pipeline_stages or 1)
        where = "virtual_pipeline_stages" if self.virtual_pipeline_stages else "pipeline_parallel"
        check(
            model.n_layers % chunks == 0,
            p + where,
            f"model.n_layers ({model.n_layers}) is not divisible by pipeline_parallel {pp} x "
            f"virtual_pipeline_stages {self.virtual_pipeline_stages or 1} = {chunks} chunks: "
            "every pipeline chunk holds the same number of whole layers",
        )
        k = self.recompute_num_layers
        if self.recompute_granularity == "full" and k is not None and chunks and model.n_layers % chunks == 0:
            per = model.n_layers // chunks
            check(
                k <= per,
                p + "recompute_num_layers",
                f"({k}) is more than the {per} layers of a pipeline stage (model.n_layers {model.n_layers} over "
                f"{chunks} pipeline chunks): groups never span stages; set it to at most {per}",
            )


@dataclass
class CheckpointConfig:
    """Saving the whole training state, and resuming from it."""

    dir: str = "{run_dir}/checkpoints"
    """Where checkpoints go; {run_dir} is the run directory. Must be on a filesystem every rank sees."""
    interval_steps: int = 0
    """Save every this many steps (0: not by step count)."""
    interval_minutes: float | None = None
    """Also save when this many minutes have passed since the last save (null: not by time)."""
    on_signal: bool = True
    """On SIGTERM or SIGUSR1 (what SLURM sends before a preemption or the time limit) or Ctrl-C (SIGINT), save at
    the end of the current step and stop with exit code 75 (a second Ctrl-C stops at once)."""
    at_end: bool = True
    """Save after the last step."""
    keep_last: int = 2
    """Keep the newest this many checkpoints; older ones are deleted once a newer one is published."""
    keep_every: int = 0
    """Also keep, permanently, every checkpoint whose step is a multiple of this (0: none)."""
    resume: str = "auto"
    """auto: continue from the run directory's latest checkpoint when there is one; none: always start fresh;
    or the path of a checkpoint (or of a checkpoints directory, whose latest is used)."""
    verify: bool = True
    """Check every file's size and checksum against the manifest before loading."""
    background: bool | None = None
    """Save interval checkpoints in the background: the step loop waits only while the state is copied to host
    memory (the wait is logged as checkpoint_stall_s), a thread writes the files, and the checkpoint is
    published at the first step end after every rank has written. Needs host memory for a second copy of this
    rank's state. Saves on a signal and at the end wait for the files. null: on for CUDA runs, off on CPU."""

    def validate(self, prefix: str = "checkpoint") -> None:
        p = prefix + "."
        check(self.interval_steps >= 0, p + "interval_steps", f"must be 0 or more, got {self.interval_steps}")
        check(
            self.interval_minutes is None or self.interval_minutes > 0,
            p + "interval_minutes",
            f"must be positive (or null), got {self.interval_minutes}",
        )
        check(
            self.keep_last >= 1,
            p + "keep_last",
            f"must be at least 1 (the latest is always kept), got {self.keep_last}",
        )
        check(self.keep_every >= 0, p + "keep_every", f"must be 0 or more, got {self.keep_every}")
        check(bool(self.resume), p + "resume", "must be auto, none, or a path")
        check(bool(self.dir), p + "dir", "must not be empty")
        if self.interval_steps == 0 and self.interval_minutes is None:
            check_unused(
                self, prefix, ("background",),
                "only interval saves run in the background, and neither checkpoint.interval_steps nor "
                "interval_minutes is set",
            )  # fmt: skip


@dataclass
class LogConfig:
    """Where a run writes."""

    run_dir: str = "runs/{name}"
    """Run directory; {name} is replaced by `name`."""
    name: str = "run"
    """The run's name (the run directory, and the tensorboard run)."""
    tensorboard: bool = True
    """Write tensorboard events under RUN_DIR/tensorboard."""
    progress: bool = True
    """A live progress bar (tqdm) on the console."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s per device for MFU. None: known GPUs (H100 SXM 989); no MFU on CPU."""

    def validate(self, prefix: str = "log") -> None:
        check(bool(self.name), prefix + ".name", "must not be empty")
