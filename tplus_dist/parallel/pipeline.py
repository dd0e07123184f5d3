"""Pipeline parallelism through DeepSpeed's pipeline engine (GPT-NeoX's pairing): contiguous layers per stage,
its 1F1B training schedule, micro-batches from gradient accumulation, tied embedding and head across the first
and last stage, ZeRO 0 or 1 across data-parallel replicas.

Why DeepSpeed's engine rather than the alternatives (tried here on CPU/gloo, see ../shared/FACTS.md):
megatron-core's get_forward_backward_func schedules allocate on CUDA, so CI could not run them;
torch.distributed.pipelining runs on gloo and has interleaved schedules, but leaves the tied-weight gradient
all-reduce, data-parallel gradient reduction (DDP breaks with several stages per rank) and checkpointing to us;
DeepSpeed's engine does all three, runs on gloo and NCCL, and its universal checkpoints re-split stages. What it
lacks: ZeRO 2/3, and the interleaved (virtual-stage) schedule, for which parallel/interleaved.py runs
torch.distributed.pipelining's.

The stage layers are parts of our Decoder (model/decoder.py): the embedding, one part per block, the final norm
and head; their parameter names and initial values are the whole decoder's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from tplus_dist.backends.base import LayerProvider
from tplus_dist.config.model import ModelConfig
from tplus_dist.model.decoder import Decoder, ParamKind, parameter_kind
from tplus_dist.model.init import module_weight
from tplus_dist.optim.guard import StepGuard
from tplus_dist.parallel.groups import ProcessGroups
from tplus_dist.token_mean import PARTS, LossSums, count_targets_each, global_token_count

MicroBatch = tuple[torch.Tensor, torch.Tensor]


class BlockPart(Decoder):
    """One transformer layer as a pipeline layer (its own class so that stages are balanced by counting it)."""


def _project_with_embedding(part: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last stage's use of the tied embedding: the output projection."""
    assert isinstance(part, Decoder) and part.embed is not None
    return part.project(x, module_weight(part.embed))


class DecoderLoss:
    """The pipeline's loss_fn(logits, targets): the decoder's loss (vocab-parallel under TP), weighted for a token
    mean, with what it computed kept for the metrics.

    A pipeline runtime back-propagates what this returns, scaled its own way (DeepSpeed's engine by
    1/gradient_accumulation_steps, then averaged over data parallel; the interleaved runner's schedule as it is
    told). :meth:`begin` sets the step's weight per counted target, ``w``: a micro-batch with ``c`` counted targets
    and mean loss ``l`` returns ``l x c x w``, so the gradient is that of the mean over every counted target of the
    step when ``w`` undoes the runtime's own scaling over the step's count ``N`` (token_mean.py). The count is taken
    on the device (no synchronisation per micro-batch); :meth:`take` reads the sums once."""

    def __init__(self, cfg: ModelConfig, provider: LayerProvider) -> None:
        self.cfg, self.provider = cfg, provider
        self.weight = 1.0
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin(self, weight: float) -> None:
        """A new step or evaluation: ``weight`` per counted target, and no sums yet."""
        self.weight, self._records = weight, []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        loss, parts = self.provider.lm_loss(
            logits, targets, vocab_size=c.vocab_size, z_loss=c.z_loss, ignore_index=c.ignore_index
        )
        count = (targets != c.ignore_index).sum()
        terms = torch.stack([loss.detach(), parts["ce"], parts.get("z_loss", torch.zeros_like(loss))]).double()
        self._records.append((terms * count, count))
        return loss * (count * self.weight)

    def take(self, counts: bool, micro_batches: int) -> LossSums:
        """This rank's loss sums over the last ``micro_batches`` calls since :meth:`begin` (empty on a rank without
        the last stage); ``counts``: whether they enter the mean over ranks. The last ones: torch.distributed.pipelining
        calls the loss once more, first, when a schedule infers its stages' gradient shapes (``_prepare_backward_infra``
        in its first step)."""
        records = self._records[-micro_batches:]
        if not records:
            return LossSums(counts=counts)
        sums = torch.stack([r[0] for r in records]).sum(0).tolist()
        tokens = int(torch.stack([r[1] for r in records]).sum())
        return LossSums(dict(zip(PARTS, sums, strict=True)), tokens, counts)


_STAGE_PREFIX = re.compile(r"^(?:tied_modules\.[^.]+|\d+)\.")


def decoder_name(pipeline_name: str) -> str:
    """A pipeline module's parameter name -> the decoder's ("5.layers.3.attn.wq.weight" -> "layers.3.attn.wq.weight",
    "tied_modules.embed.embed.weight" -> "embed.weight")."""
    return _STAGE_PREFIX.sub("", pipeline_name, count=1)


def build_pipeline(cfg: ModelConfig, provider: LayerProvider, groups: ProcessGroups, init_seed: int) -> nn.Module:
    """The decoder as a DeepSpeed PipelineModule over ``groups``' layout; this rank builds its stage only.
    DeepSpeed's topology orders ranks pipe-data-model, which is megatron's tp-dp-pp: the same groups."""
    import deepspeed
    import torch.distributed as dist

    from tplus_dist.console import quiet_stdout

    with quiet_stdout():  # (DeepSpeed prints "... built successfully" on every rank, even when it only loaded an op)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # PipelineModule talks through deepspeed.comm
    part: dict[str, Any] = dict(init_seed=init_seed)
    embed: dict[str, Any] = dict(part, layers=(), embed=True, head=False)
    tied = cfg.tie_embeddings
    specs: list[Any] = []
    if tied:  # the first stage looks tokens up, the last projects with the same (all-reduced) weight
        specs.append(TiedLayerSpec("embed", Decoder, cfg, provider, tied_weight_attr=["embed.weight"], **embed))
    else:
        specs.append(LayerSpec(Decoder, cfg, provider, **embed))
    specs += [
        LayerSpec(BlockPart, cfg, provider, layers=(i,), embed=False, head=False, **part) for i in range(cfg.n_layers)
    ]
    # the head part: final norm and (untied) output projection; a tied model's stops at the final norm
    specs.append(LayerSpec(Decoder, cfg, provider, layers=(), embed=False, head=True, **part))
    if tied:
        specs.append(
            TiedLayerSpec(
                "embed", Decoder, cfg, provider, forward_fn=_project_with_embedding, tied_weight_attr=["embed.weight"],
                **embed,
            )
        )  # fmt: skip
    dims = groups.dims
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    # Without autograd: PipelineModule broadcasts the tied weights from the first stage in place; under autograd that
    # records c10d::broadcast_ (which has no backward) in the weight's history, and every backward then warned
    # "an autograd kernel was not registered" on every rank. The values are the same; only the record goes.
    with torch.no_grad():
        return DecoderPipeline(
            cfg,
            layers=specs,
            topology=topology,
            loss_fn=DecoderLoss(cfg, provider),
            partition_method=f"type:{BlockPart.__name__}",
            activation_checkpoint_interval=0,
        )


class DecoderPipeline(PipelineModule):
    """DeepSpeed's PipelineModule with the decoder's parameter roles (for weight decay and muP groups)."""

    def __init__(self, cfg: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg

    @staticmethod
    def decoder_name(name: str) -> str:
        return decoder_name(name)

    def parameter_kinds(self) -> Iterator[tuple[str, nn.Parameter, ParamKind]]:
        for name, p in self.named_parameters():
            yield name, p, parameter_kind(decoder_name(name), p)


class PipelineGradNorm:
    """An fp32 ZeRO 0 pipeline engine's pre-clip gradient norm, measured once per step, and its clipping replaced by
    a correct one that uses it (installed by :func:`clip_pipeline_fp32_grads`).

    DeepSpeed 0.19.8's clip_fp32_gradients counts a parameter that is not tensor-parallel only on model-parallel
    rank 0, and for a pipeline that group spans the stages: the norm (and so the clipping) leaves out every later
    stage's layers, and drops the value besides. Here each parameter counts once: tensor-parallel slices on every
    rank, the rest on tensor-parallel rank 0, a tied embedding's copy on its owning stage only; the squares are
    summed over the stages and tensor-parallel ranks (the TP x PP group). The engine calls the clipping only when
    gradient_clipping > 0; the step guard asks for the norm either way (a collective: every rank asks, inside the
    optimizer step)."""

    def __init__(self, engine: Any, groups: ProcessGroups) -> None:
        self.engine, self.groups = engine, groups
        self.value: float | None = None
        engine.clip_fp32_gradients = self._clip_and_keep

    def reset(self) -> None:
        """A new step: the next call measures again."""
        self.value = None

    def __call__(self) -> float:
        if self.value is None:
            self.value = self._measure()
        return self.value

    def _measure(self) -> float:
        from deepspeed.runtime.utils import is_model_parallel_parameter

        from tplus_dist.optim.clipping import clip_grad_norm

        groups = self.groups

        def reduce_sq(t: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(t, group=groups.mp)
            return t

        counted = [
            p
            for p in self.engine.module.parameters()
            if p.grad is not None
            and not getattr(p, "ds_pipe_replicated", False)
            and (groups.tp_rank == 0 or is_model_parallel_parameter(p))
        ]
        return clip_grad_norm(counted, 0.0, reduce_sq=reduce_sq)  # 0: measure only

    def _clip_and_keep(self) -> None:
        engine = self.engine
        norm = self()
        if engine.gradient_clipping() > 0:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), torch.tensor(norm))
        engine._global_grad_norm = norm


def clip_pipeline_fp32_grads(engine: Any, groups: ProcessGroups) -> PipelineGradNorm:
    """Replace an fp32 ZeRO 0 pipeline engine's gradient clipping with a correct one that keeps the norm (see
    :class:`PipelineGradNorm`); returns the norm's source."""
    return PipelineGradNorm(engine, groups)


def engine_grad_norm(engine: Any, groups: ProcessGroups) -> Callable[[], float]:
    """The step guard's norm source for a pipeline's DeepSpeed engine: :class:`PipelineGradNorm` for fp32 ZeRO 0
    (reset it each step), DeepSpeed's own for ZeRO 1 and bf16 (parallel.engine.deepspeed_grad_norm)."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        return clip_pipeline_fp32_grads(engine, groups)
    from tplus_dist.parallel.engine import deepspeed_grad_norm

    return lambda: deepspeed_grad_norm(engine)


class PipelineStepRunner:
    """The trainer's StepRunner over DeepSpeed's pipeline engine: one train_batch per optimizer step, with as many
    micro-batches as the step has (a growing batch changes their number). Every rank of a replica reads the same
    micro-batches; the first stage uses the tokens, the last the targets. The engine back-propagates the loss
    function's value divided by the accumulation count and averages gradients over data parallel, so the loss
    function (:class:`DecoderLoss`) is told the weight ``n x dp / N`` per counted target (``N``: the step's counted
    targets over every replica). train_batch runs the whole step, so the guard reads the loss inside it, when the
    engine's optimizer step asks: the last stage's sums, kept by the loss function."""

    def __init__(self, engine: Any, groups: ProcessGroups, device: torch.device, guard: StepGuard) -> None:
        self.engine = engine
        self.groups = groups
        self.device = device
        self.guard = guard
        self.norm = engine_grad_norm(engine, groups)
        self.counts_loss = engine.is_last_stage() and groups.tp_rank == 0
        self.loss: DecoderLoss = engine.module.loss_fn

    def _iter(self, micro_batches: Sequence[Any]) -> Iterator[MicroBatch]:
        return iter([(mb.tokens.to(self.device), mb.targets.to(self.device)) for mb in micro_batches])

    def run(self, micro_batches: Sequence[Any], before_update: Callable[[], None]) -> tuple[dict[str, float], float]:
        eng = self.engine
        n = len(micro_batches)
        if eng.gradient_accumulation_steps() != n:
            eng.set_train_batch_size(micro_batches[0].tokens.shape[0] * n * eng.dp_world_size)
        ignore = self.loss.cfg.ignore_index
        total = global_token_count(
            sum(count_targets_each([mb.targets for mb in micro_batches], ignore)), self.groups.dp, self.device
        )
        self.loss.begin(n * eng.dp_world_size / total)
        before_update()  # the step's lr and weight decay, in the groups the engine steps with
        if isinstance(self.norm, PipelineGradNorm):
            self.norm.reset()
        self.guard.arm(lambda: self.loss.take(self.counts_loss, n), self.norm)
        eng.train_batch(self._iter(micro_batches))
        verdict = self.guard.conclude()  # the global token mean (the engine's own is a mean of means)
        return {"loss": verdict.loss, **(verdict.parts or {})}, verdict.grad_norm

    def evaluate(self, batches: Sequence[Any]) -> LossSums:
        """This rank's validation loss sums over ``batches`` (one micro-batch each), through the pipeline (the
        last stage's; the trainer adds them over the replicas). A short last batch is padded to the micro-batch size
        (:func:`pad_micro_batch`): the engine fixes the activation shapes it sends between stages at its first use,
        so another shape would fail on one stage while the others wait for it."""
        micro, ignore = self.engine.train_micro_batch_size_per_gpu(), self.loss.cfg.ignore_index
        self.loss.begin(1.0)
        for mb in batches:
            x, y = pad_micro_batch(mb.tokens, mb.targets, micro, ignore)
            self.engine.eval_batch(iter([(x.to(self.device), y.to(self.device))]), num_micro_batches=1)
        return self.loss.take(self.counts_loss, len(batches))


def pad_micro_batch(
    tokens: torch.Tensor, targets: torch.Tensor, size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` and ``targets`` [m, s] grown to [size, s] with rows whose targets are all ``ignore_index`` (their
    tokens copy row 0, any valid ids would do): the loss, a mean over the targets that count (model/loss.py, the
    vocabulary-parallel loss alike), and its z-loss term are those of the m real rows. Raises ValueError when
    m > size."""
    m = tokens.shape[0]
    if m > size:
        raise ValueError(f"a micro-batch of {m} sequences is larger than the pipeline's micro-batch size {size}")
    if m == size:
        return tokens, targets
    pad = size - m
    return (
        torch.cat([tokens, tokens[:1].expand(pad, -1)]),
        torch.cat([targets, targets.new_full((pad, targets.shape[1]), ignore_index)]),
    )
