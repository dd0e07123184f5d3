"""The interleaved 1F1B pipeline (Narayanan et al. 2021): each pipeline rank holds ``virtual_pipeline_stages``
chunks of layers, stage s = chunk * pp + rank, so a micro-batch visits every rank several times and the bubble
shrinks by that factor. DeepSpeed's pipeline engine has no such schedule; this runs torch.distributed.pipelining's
ScheduleInterleaved1F1B (gloo and NCCL) under a plain DeepSpeed engine (ZeRO 0 or 1), which reduces gradients
over data parallel and steps the optimizer.

What DeepSpeed's pipeline engine did for us and is done here instead: the tied embedding's gradient is summed
between the first and the last stage (the last stage's copy is marked ``ds_pipe_replicated`` so that the gradient
norm counts it once), the gradients are reduced over data parallel after the schedule's backward
(``allreduce_gradients``), and the loss is averaged over micro-batches and replicas.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tplus_dist.backends.base import LayerProvider
from tplus_dist.config.model import ModelConfig
from tplus_dist.model.decoder import Decoder, ParamKind, parameter_kind
from tplus_dist.optim.guard import StepGuard
from tplus_dist.parallel.groups import ProcessGroups
from tplus_dist.parallel.pipeline import DecoderLoss, PipelineGradNorm, engine_grad_norm, pad_micro_batch
from tplus_dist.token_mean import LossSums, count_targets_each, global_token_count

_CHUNK_PREFIX = re.compile(r"^chunks\.\d+\.")


class InterleavedChunks(nn.Module):
    """This pipeline rank's chunks, each a Decoder part with the whole decoder's parameter names."""

    def __init__(
        self, cfg: ModelConfig, provider: LayerProvider, groups: ProcessGroups, virtual: int, init_seed: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.provider = provider
        pp, rank = groups.dims.pp, groups.pp_rank
        self.num_stages = pp * virtual
        per = cfg.n_layers // self.num_stages
        self.stage_ids = [c * pp + rank for c in range(virtual)]
        last = self.num_stages - 1
        self.chunks = nn.ModuleList(
            Decoder(
                cfg,
                provider,
                layers=range(s * per, (s + 1) * per),
                embed=s == 0,
                head=s == last,
                tied_output=True,
                init_seed=init_seed,
            )
            for s in self.stage_ids
        )
        if cfg.tie_embeddings and last in self.stage_ids and 0 not in self.stage_ids:
            copy = self.tied_embedding()
            assert copy is not None
            copy.ds_pipe_replicated = True  # type: ignore[attr-defined]  # the gradient norm counts it once

    @staticmethod
    def decoder_name(name: str) -> str:
        return _CHUNK_PREFIX.sub("", name, count=1)

    def parameter_kinds(self) -> Iterator[tuple[str, nn.Parameter, ParamKind]]:
        for name, p in self.named_parameters():
            yield name, p, parameter_kind(self.decoder_name(name), p)

    def tied_embedding(self) -> nn.Parameter | None:
        """This rank's copy of a tied embedding, if it holds the first or the last stage."""
        if not self.cfg.tie_embeddings:
            return None
        for s, chunk in zip(self.stage_ids, self.chunks, strict=True):
            if s in (0, self.num_stages - 1):
                assert isinstance(chunk, Decoder) and chunk.embed is not None
                weight = chunk.embed.weight
                assert isinstance(weight, nn.Parameter)
                return weight
        return None


def tied_embedding_groups(groups: ProcessGroups) -> dist.ProcessGroup | None:
    """The group {first stage, last stage} of this rank's (tp, dp) slice; every rank makes every such group, in
    the same order (new_group is collective), and gets its own (None when it holds neither end)."""
    dims, mine = groups.dims, None
    me = dims.coords(groups.rank)
    for dp in range(dims.dp):
        for tp in range(dims.tp):
            ranks = sorted({dims.rank_of(tp, dp, 0), dims.rank_of(tp, dp, dims.pp - 1)})
            group = dist.new_group(ranks)
            if tp == me.tp and dp == me.dp and groups.rank in ranks:
                mine = group
    return mine


class InterleavedStepRunner:
    """The trainer's StepRunner for the interleaved schedule (see the module docstring)."""

    def __init__(
        self, engine: Any, chunks: InterleavedChunks, groups: ProcessGroups, device: torch.device, guard: StepGuard
    ) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.engine, self.chunks, self.groups, self.device, self.guard = engine, chunks, groups, device, guard
        self.loss = DecoderLoss(chunks.cfg, chunks.provider)
        self._stage_class = PipelineStage
        self.has_first = 0 in chunks.stage_ids
        self.has_last = chunks.num_stages - 1 in chunks.stage_ids
        self.tied_group = tied_embedding_groups(groups) if chunks.cfg.tie_embeddings else None
        self._schedules: dict[tuple[int, bool], Any] = {}
        self.norm = engine_grad_norm(engine, groups)
        # the rank that holds the last stage knows its replica's loss
        self.counts_loss = self.has_last and groups.tp_rank == 0

    def _schedule(self, n: int, train: bool) -> Any:
        """A schedule with its own PipelineStage objects for each (micro-batch count, train or eval): a stage
        prepares its buffers for the first schedule that runs it and keeps them, so sharing stages between a
        training schedule and an evaluation one (or a growing batch's counts) computes wrong gradients."""
        from torch.distributed.pipelining import ScheduleInterleaved1F1B

        key = (n, train)
        if key not in self._schedules:
            c, dev, group = self.chunks, self.device, self.groups.pp
            stages: list[Any] = [
                self._stage_class(chunk, stage_index=s, num_stages=c.num_stages, device=dev, group=group)
                for s, chunk in zip(c.stage_ids, c.chunks, strict=True)
            ]
            # scale_grads=False: the loss function's weights make the token mean (DecoderLoss.begin)
            self._schedules[key] = ScheduleInterleaved1F1B(
                stages, n_microbatches=n, loss_fn=self.loss, scale_grads=False
            )
        return self._schedules[key]

    def _run(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], train: bool, weight: float) -> LossSums:
        """Run the schedule over the micro-batches, ``weight`` per counted target (:class:`DecoderLoss`); this
        rank's loss sums (those of the last stage's rank)."""
        sched = self._schedule(len(micro_batches), train)
        tokens = torch.cat([x for x, _ in micro_batches]).to(self.device)
        targets = torch.cat([y for _, y in micro_batches]).to(self.device)
        args = (tokens,) if self.has_first else ()
        kw: dict[str, Any] = dict(target=targets) if self.has_last else {}
        self.loss.begin(weight)
        if train:
            sched.step(*args, **kw)
        else:
            sched.eval(*args, **kw)
        return self.loss.take(self.counts_loss, len(micro_batches))

    def run(self, micro_batches: Sequence[Any], before_update: Callable[[], None]) -> tuple[dict[str, float], float]:
        eng = self.engine
        n = len(micro_batches)
        if eng.gradient_accumulation_steps() != n:
            eng.set_train_batch_size(micro_batches[0].tokens.shape[0] * n * eng.dp_world_size)
        for p in self.chunks.parameters():
            p.grad = None
        ignore = self.chunks.cfg.ignore_index
        total = global_token_count(
            sum(count_targets_each([mb.targets for mb in micro_batches], ignore)), self.groups.dp, self.device
        )
        # the gradients are summed over micro-batches (scale_grads=False), then averaged over data parallel
        share = self._run(
            [(mb.tokens, mb.targets) for mb in micro_batches], train=True, weight=eng.dp_world_size / total
        )
        tied = self.chunks.tied_embedding()
        if self.tied_group is not None and tied is not None and tied.grad is not None:
            dist.all_reduce(tied.grad, group=self.tied_group)  # the embedding's and the head's use
        eng.set_gradient_accumulation_boundary(True)
        eng.allreduce_gradients()  # over data parallel (ZeRO 1: into its partitions)
        before_update()
        if isinstance(self.norm, PipelineGradNorm):
            self.norm.reset()
        self.guard.arm(lambda: share, self.norm)
        eng.step()  # the client optimizer's step asks the guard
        verdict = self.guard.conclude()  # the token mean over the replicas
        return {"loss": verdict.loss, **(verdict.parts or {})}, verdict.grad_norm

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Any]) -> LossSums:
        """This rank's validation loss sums over ``batches`` (one micro-batch each; the trainer adds them over the
        replicas); a short last batch is padded (pad_micro_batch): the stages keep the shapes of the first batch their
        schedule ran."""
        micro, ignore = self.engine.train_micro_batch_size_per_gpu(), self.chunks.cfg.ignore_index
        total = LossSums(counts=self.counts_loss)
        for mb in batches:
            total.merge(self._run([pad_micro_batch(mb.tokens, mb.targets, micro, ignore)], train=False, weight=1.0))
        return total
