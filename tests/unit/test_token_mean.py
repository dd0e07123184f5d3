"""Every reported loss is the mean over the targets that count (token_mean.py), checked against plain PyTorch on
one batch: the training step's loss terms and gradient with deliberately uneven ignored targets across
micro-batches, the validation loss with a short last batch, and a validation set that is the same samples in every
layout. The multi-process layouts are checked against one process in tests/distributed (UNEVEN there)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tplus_dist.config import ConfigError, load_config
from tplus_dist.config.run import RunConfig
from tplus_dist.data.loader import EvalBatches, MicroBatch, StepBatch
from tplus_dist.model import build_model
from tplus_dist.train.trainer import Trainer

SEQ, VOCAB, IGNORE, Z = 16, 64, -100, 1e-3


def _cfg() -> RunConfig:
    cfg = load_config("configs/tiny.yaml", [f"--model.seq_len={SEQ}", f"--model.z_loss={Z}", "--optim.grad_clip=0"])
    cfg.model.vocab_size, cfg.model.n_layers = VOCAB, 2
    return cfg


def _batches(sizes: list[int], seed: int) -> list[MicroBatch]:
    """Micro-batches of the given sizes; sample i counts its first (7 i) mod (SEQ + 1) targets (0 to all), so
    their counts differ."""
    g = torch.Generator().manual_seed(seed)
    out, first = [], 0
    for m in sizes:
        chunk = torch.randint(0, VOCAB, (m, SEQ + 1), generator=g)
        targets = chunk[:, 1:].clone()
        for row in range(m):
            targets[row, (7 * (first + row)) % (SEQ + 1) :] = IGNORE
        out.append(MicroBatch(chunk[:, :-1], targets, np.arange(first, first + m)))
        first += m
    return out


def _reference(model: torch.nn.Module, batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
    """Plain PyTorch on one batch: the mean cross entropy over every counted target of all the micro-batches, and
    PaLM's z-loss Z * mean(logsumexp^2) over the same targets."""
    tokens = torch.cat([mb.tokens for mb in batches])
    targets = torch.cat([mb.targets for mb in batches]).flatten()
    logits = model(tokens).flatten(0, 1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE)
    keep = targets != IGNORE
    z = Z * torch.logsumexp(logits, dim=-1)[keep].pow(2).mean()
    return {"loss": ce + z, "ce": ce, "z_loss": z}


class _Source:
    def __init__(self, batches: list[MicroBatch]) -> None:
        self.batches = batches

    def next_step(self) -> StepBatch:
        n = sum(mb.tokens.shape[0] for mb in self.batches)
        return StepBatch(self.batches, n, 0, n - 1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _ConstantLR:
    def update(self, step: int, tokens_after: int) -> None:
        pass

    def get_lr(self) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _trainer(batches: list[MicroBatch], val: list[MicroBatch] | None = None) -> Trainer:
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
    return Trainer(cfg, model, opt, _ConstantLR(), _Source(batches), val, torch.device("cpu"))


def test_a_step_is_the_gradient_of_the_token_mean_over_uneven_micro_batches() -> None:
    batches = _batches([2, 2, 2, 2], seed=1)
    counts = [int((mb.targets != IGNORE).sum()) for mb in batches]
    assert len(set(counts)) == len(counts), counts  # uneven: a mean of micro-batch means would differ
    trainer = _trainer(batches)
    before = copy.deepcopy(trainer.model)
    ref = _reference(before, batches)
    ref["loss"].backward()

    metrics = trainer.train_step()

    for key in ("loss", "ce", "z_loss"):
        assert metrics[key] == pytest.approx(float(ref[key].detach()), rel=1e-6, abs=1e-9), key
    worst = 0.0
    for (name, p), q in zip(trainer.model.named_parameters(), before.parameters(), strict=True):
        assert q.grad is not None
        update = q.detach() - p.detach()  # SGD with lr 1: the gradient the step applied
        torch.testing.assert_close(update, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        worst = max(worst, float(q.grad.abs().max()))
    assert worst > 1e-3  # the gradients are not trivially zero
    # the mean of the micro-batch means (what the loop used to report) is visibly different
    with torch.no_grad():
        per_mb = [float(_reference(before, [mb])["loss"]) for mb in batches if (mb.targets != IGNORE).any()]
    assert abs(sum(per_mb) / len(per_mb) - metrics["loss"]) > 1e-3


def test_validation_loss_is_the_token_mean_with_a_short_last_batch() -> None:
    val = _batches([3, 3, 1], seed=2)
    trainer = _trainer(_batches([2], seed=3), val)
    with torch.no_grad():
        expected = float(_reference(trainer.model, val)["loss"])
        per_batch = [float(_reference(trainer.model, [mb])["loss"]) for mb in val]
    got = trainer.evaluate()
    assert got == pytest.approx(expected, rel=1e-6)
    assert abs(sum(per_batch) / len(per_batch) - expected) > 1e-3  # the old mean of means is not it


class _Split:
    def __init__(self, n: int) -> None:
        self.rows = [np.full(SEQ + 1, i % VOCAB, dtype=np.int64) for i in range(n)]

    @property
    def num_samples(self) -> int:  # (streaming's StreamingDataset spelling)
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": self.rows[i]}


@pytest.mark.parametrize("n_samples", [None, 13])
def test_the_validation_set_is_the_same_samples_in_every_layout(n_samples: int | None) -> None:
    split = _Split(21)
    want = list(range(21 if n_samples is None else n_samples))
    for micro in (1, 2, 4, 16):
        for dp in (1, 2, 3):
            ranks = [
                list(EvalBatches(split, SEQ, micro, n_samples, dp_size=dp, dp_rank=r, ignore_index=IGNORE))
                for r in range(dp)
            ]
            assert len({len(r) for r in ranks}) == 1, (micro, dp)  # every rank runs as many forwards
            seen = sorted(int(p) for rank in ranks for mb in rank for p in mb.positions)
            assert seen == want, (micro, dp)
            for rank in ranks:
                for mb in rank:
                    counted = int((mb.targets != IGNORE).sum())
                    assert counted == len(mb.positions) * SEQ  # a stand-in (no position) counts nothing
                    assert mb.tokens.shape[0] <= micro


def test_a_validation_set_larger_than_the_split_or_the_old_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(30\) is more than the 21 samples"):
        EvalBatches(_Split(21), SEQ, 4, 30)
    with pytest.raises(ConfigError, match=r"train\.eval_batches: was replaced by train\.eval_samples"):
        load_config("configs/tiny.yaml", ["--train.eval_batches=8"])
    with pytest.raises(ConfigError, match=r"train\.eval_samples: must be positive"):
        load_config("configs/tiny.yaml", ["--train.eval_samples=0"]).validate()


def test_a_checkpoint_config_of_the_previous_version_still_loads() -> None:
    """A checkpoint saved before eval_samples (and before the OLMo 2 / Qwen2 fields) exports and resumes: the
    replaced key is dropped from the saved config and the new fields take their defaults (tried end to end with a
    checkpoint of commit bc524bb: `tplus export` and the resume both work)."""
    from tplus_dist.checkpoint.manager import model_identity
    from tplus_dist.config import from_dict, to_dict
    from tplus_dist.config.base import without_renamed

    now = load_config("configs/tiny.yaml")
    old = to_dict(now)
    old["train"].pop("eval_samples")
    old["train"]["eval_batches"] = 8
    for field in ("qk_norm_scope", "qkv_bias", "norm_placement"):
        old["model"].pop(field, None)
    with pytest.raises(ConfigError, match="eval_batches"):
        from_dict(RunConfig, old)
    cfg = from_dict(RunConfig, without_renamed(old))
    assert cfg.train.eval_samples is None and cfg.model == now.model
    assert model_identity(old["model"]) == model_identity(to_dict(now)["model"])


class _HostReads:
    """Counts reads of tensor values into Python while active: ``aten._local_scalar_dense`` (what ``.item()``,
    ``float()``, ``int()`` and ``bool()`` of a tensor dispatch to) and ``Tensor.tolist`` (which reads without an aten
    op). On a GPU each is a synchronisation: the host waits for every kernel queued before it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.count = 0
        reads = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads.count += 1
                return func(*args, **(kwargs or {}))

        tolist = torch.Tensor.tolist

        def counted_tolist(t: torch.Tensor) -> Any:
            reads.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        self.mode = Mode()


def test_host_reads_per_step_do_not_grow_with_micro_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step reads its loss terms once, not once per micro-batch (issue 16: a .item() per micro-batch stalls a GPU's
    run-ahead). The same step with 1 and with 8 micro-batches makes the same number of host reads."""
    reads = _HostReads(monkeypatch)
    seen = {}
    for sizes in ([8], [1] * 8):
        trainer = _trainer(_batches(sizes, seed=4))
        trainer.train_step()  # (first step: lazy optimizer state)
        reads.count = 0
        with reads.mode:
            metrics = trainer.train_step()
        seen[len(sizes)] = reads.count
        assert metrics["loss"] > 0
    assert seen[1] == seen[8], seen
    assert seen[1] > 0  # the counter sees the step's reads (the loss must reach the host once)
