"""A whole run: the sections, loaded from YAML with ``--section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tplus_dist.config.base import ConfigError, check, from_dict, is_set, to_dict
from tplus_dist.config.model import ModelConfig
from tplus_dist.config.sections import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` (an exponent without a dot) as a float, as YAML 1.2 does;
    PyYAML's YAML 1.1 resolver would make it the string '3e-4'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


FP8_ALIGN = 16
"""TE 2.20.2 utils.py ``assert_dim_for_fp8_exec``: an FP8 GEMM's input has its last dimension a multiple of 16, and
its weight ([out, in]) both dimensions (in % 16, out % 8: 16 is asked of both, as the issue and Megatron's
--fp8 docs state it). quantization.py ``get_align_size_for_quantization`` gives 16 for the delayed, current and
block recipes too (32 only for MXFP8, 128 for NVFP4, which we do not offer)."""
FP8_TOKEN_ALIGN = 16
"""Tokens per micro-batch (micro-batch x sequence) a multiple of 16. TE 2.20.2 asserts 8 in the forward (utils.py
``assert_dim_for_fp8_exec``, l. 708: the product of an input's leading dimensions), but documents 16 (quantization.py
``autocast`` docstring, l. 983-985: "both dimensions are divisible by 16 ... padding sequence length to be multiple of
16"): in the backward the token dimension is the weight-gradient GEMM's inner dimension, which no assertion guards
before cuBLAS sees it. The documented bound is the one held to."""


def fp8_gemm_dims(cfg: RunConfig) -> list[tuple[str, str, int]]:
    """The GEMM widths one tensor-parallel rank's FP8 layers see, as (the field that sets it, what it is, size):
    d_model (the input of the q/kv projections and the MLP's first GEMM, the output of the attention projection and
    the MLP's second), the query and key/value projections' widths per rank (kv heads fewer than the ranks are
    replicated, one per rank, as parallel.check_fits allows), and the MLP's hidden width per rank. Source: TE
    2.20.2 module/linear.py, layernorm_linear.py, layernorm_mlp.py call ``assert_dim_for_fp8_exec(inputmat,
    weight)`` on exactly these operands."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    kv_per_rank = max(m.kv_heads // tp, 1)
    return [
        ("model.d_model", "the model width", m.d_model),
        ("model.n_heads", "the query projection's width per tensor-parallel rank", m.n_heads // tp * m.dim_head),
        ("model.n_kv_heads", "the key/value projections' width per tensor-parallel rank", kv_per_rank * m.dim_head),
        ("model.d_ff", "the MLP's hidden width per tensor-parallel rank", m.ffn_dim // tp),
    ]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.seq_len

    def validate(self) -> RunConfig:
        for name in ("model", "data", "optim", "schedule", "train", "precision", "parallel", "checkpoint", "log"):
            getattr(self, name).validate(name)
        # The layout against the model; the world size is only known at launch (ParallelDims.validate).
        self.parallel.check_fits(self.model)
        check(
            self.parallel.recompute_granularity == "none" or self.precision.fp8 == "none",
            "parallel.recompute_granularity",
            f"({self.parallel.recompute_granularity}) is not built with precision.fp8 {self.precision.fp8}: the "
            "recomputed forward would run outside Transformer Engine's FP8 region and its scaling state (TE's own "
            "checkpoint is needed); set recompute_granularity none or precision.fp8 none",
        )
        if self.parallel.sequence_parallel:
            tp = self.parallel.tensor_parallel
            check(
                self.seq_len % tp == 0,
                "train.seq_len" if self.train.seq_len else "model.seq_len",
                f"({self.seq_len}) must be divisible by parallel.tensor_parallel ({tp}) under "
                "parallel.sequence_parallel, which splits every sequence into tensor_parallel equal parts",
            )
            check(
                not self.train.compile,
                "train.compile",
                "cannot trace megatron-core 0.16.1's sequence-parallel matmul (its backward all-gathers with "
                "async_op=True, which torch.compile refuses); set train.compile false or parallel.sequence_parallel "
                "false",
            )
            check(
                self.model.provider != "te",
                "parallel.sequence_parallel",
                "is built through megatron-core's layers (model.provider torch under tensor parallelism), not "
                "Transformer Engine's; set model.provider torch or sequence_parallel false",
            )
        check(
            self.seq_len <= self.model.seq_len,
            "train.seq_len",
            f"({self.seq_len}) is longer than the model's context model.seq_len ({self.model.seq_len})",
        )
        check(
            self.train.batch_size_start is None
            or self.train.batch_size_start == self.train.micro_batch_size * self.train.grad_accum
            or self.schedule.unit == "tokens",
            "schedule.unit",
            "a growing batch (train.batch_size_start) needs the token clock: set schedule.unit: tokens "
            "(with warmup_tokens), so warmup and decay stay right as the batch grows",
        )
        check(
            self.schedule.min_lr <= self.optim.lr,
            "schedule.min_lr",
            f"({self.schedule.min_lr}) is above the peak optim.lr ({self.optim.lr})",
        )
        check(
            self.data.labels is not True or self.model.adaln != "none",
            "data.labels",
            "is true, but the model takes no label: set model.adaln (adaln or adaln_zero) and model.n_conditions",
        )
        self._check_fp8()
        return self

    def _check_fp8(self) -> None:
        """precision.fp8 against the other sections: the te provider, bf16, the layer counts, and the GEMM shapes
        FP8 can take (every refusal before any work is done)."""
        prec, m = self.precision, self.model
        if prec.fp8 == "none":
            return
        check(
            m.provider == "te",
            "precision.fp8",
            f"({prec.fp8!r}) runs FP8 GEMMs inside Transformer Engine's layers, so it needs model.provider te "
            f"(got {m.provider!r})",
        )
        check(
            prec.dtype in ("bf16", "auto"),
            "precision.dtype",
            f"({prec.dtype!r}) must be bf16 (or auto) with precision.fp8 {prec.fp8!r}: the GEMMs outside FP8 and the "
            "layers kept out of FP8 run in bf16",
        )
        kept = prec.num_layers_at_start_in_bf16 + prec.num_layers_at_end_in_bf16
        check(
            kept <= m.n_layers,
            "precision.num_layers_at_start_in_bf16",
            f"plus precision.num_layers_at_end_in_bf16 is {kept}, more than model.n_layers ({m.n_layers})",
        )
        for field_name, what, size in fp8_gemm_dims(self):
            check(
                size % FP8_ALIGN == 0,
                field_name,
                f"makes {what} {size}, which FP8 GEMMs cannot take: Transformer Engine needs every GEMM dimension a "
                f"multiple of {FP8_ALIGN} (TE 2.20.2 utils.py assert_dim_for_fp8_exec)",
            )
        check(
            not (self.train.compile and prec.fp8 == "delayed"),
            "train.compile",
            "cannot run with precision.fp8 delayed: Transformer Engine refuses DelayedScaling under torch.compile "
            "(TE 2.20.2 quantization.py check_recipe_support); use precision.fp8 current or block, or train.compile "
            "false",
        )
        tokens = self.train.micro_batch_size * self.seq_len
        check(
            tokens % FP8_TOKEN_ALIGN == 0,
            "train.micro_batch_size",
            f"x train.seq_len is {tokens} tokens per micro-batch, which FP8 GEMMs cannot take: Transformer Engine "
            f"needs it a multiple of {FP8_TOKEN_ALIGN} (TE 2.20.2 quantization.py, autocast's docstring)",
        )

    def resolved(self) -> RunConfig:
        """A copy with the derived fields (None in the config) set to what a run uses: the model's
        (:meth:`ModelConfig.resolved`), train.seq_len (model.seq_len), data.seed (train.seed) and, on the step clock,
        schedule.decay_steps (train.steps) for the schedules that end. Settings that depend on the machine or the
        launch (train.device auto, precision auto, checkpoint.background, decay_tokens) are left as they are."""
        schedule = self.schedule
        if schedule.unit == "steps" and schedule.decay_steps is None and schedule.name in ("cosine", "wsd"):
            schedule = dataclasses.replace(schedule, decay_steps=self.train.steps)
        data = self.data
        if data.seed is None and data.shuffle:
            data = dataclasses.replace(data, seed=self.train.seed)
        return dataclasses.replace(
            self,
            model=self.model.resolved(),
            train=dataclasses.replace(self.train, seq_len=self.seq_len),
            data=data,
            schedule=schedule,
        )

    def check_run_length(self, total_tokens: int | None = None) -> RunConfig:
        """Refuse a warmup at least as long as the run: the rate would never reach optim.lr (warmup 500 over 10 steps
        peaks at 2% of it). On the step clock against train.steps (:func:`load_config` checks it: `tplus
        verify-resume --steps N`, which replays only the first N steps of a run, is not refused); on the token clock
        against ``total_tokens``, the run's length in tokens, known once the data-parallel size is (the run's start
        checks it). Raises ConfigError naming the warmup field."""
        s = self.schedule
        if s.unit == "steps":
            check(
                s.warmup_steps < self.train.steps,
                "schedule.warmup_steps",
                f"({s.warmup_steps}{'' if is_set(s, 'warmup_steps') else ', the default'}) is at least the whole run "
                f"(train.steps {self.train.steps}), so the rate would never reach optim.lr; make the warmup shorter "
                "than the run",
            )
        elif total_tokens is not None:
            check(
                s.warmup_tokens < total_tokens,
                "schedule.warmup_tokens",
                f"({s.warmup_tokens}) is at least the whole run ({total_tokens} tokens: train.steps x the global "
                "batch x seq_len), so the rate would never reach optim.lr; make the warmup shorter than the run",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``defaults: [files]`` (relative to it, or to configs/) are merged first."""
    if path.is_dir():
        raise ConfigError("", f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError("", f"config file {path} does not exist")
    if path in seen:
        raise ConfigError("defaults", f"{path} includes itself (through {' -> '.join(map(str, seen))})")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    for d in defaults:
        candidate = (path.parent / d) if (path.parent / d).exists() else CONFIGS_DIR / d
        merged = _deep_merge(merged, _read_yaml(candidate.resolve(), (*seen, path)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``--model.n_layers=4`` / ``model.n_layers=4`` -> {"model": {"n_layers": 4}} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(text, "override must look like --section.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(key, "override key must be section.key (for example --model.n_layers=4)")
        try:
            value = _yaml_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config. Raises ConfigError naming the field on bad input."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIGS_DIR / p).is_file():
            p = CONFIGS_DIR / p
        data = _read_yaml(p.resolve())
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data)
    return cfg.validate().check_run_length()
