"""Bad steps in one process: a step whose gradient norm or loss is not finite changes no weight and no optimizer state
(against a snapshot taken before it), is counted, and training goes on; too many in a row stop the run without
publishing anything damaged; a save refuses non-finite weights; the spike rule skips exactly the steps a numpy
recomputation of it from the logged series picks; a resumed run keeps the counts and the window."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.distributed.test_tp_training import BASE as TP_BASE
from tplus_dist.checkpoint import CheckpointError
from tplus_dist.checkpoint.manager import CheckpointManager
from tplus_dist.checkpoint.sharded import checkpoint_parameters
from tplus_dist.checkpoint.store import find_checkpoint
from tplus_dist.checkpoint.verify import verify_resume
from tplus_dist.config import load_config
from tplus_dist.optim.guard import SkippedStepsError
from tplus_dist.train.hooks import Hook
from tplus_dist.train.metrics import read_metrics
from tplus_dist.train.run import build_trainer, checkpoint_root, train

BASE = [*TP_BASE, "--model.n_layers=2", "--checkpoint.at_end=false"]
"""The tensor-parallel tests' five steps (tests/distributed/test_tp_training.py), two layers, no save at the end."""


def _cfg(run_dir: Path, *extra: str) -> Any:
    return load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", *extra])


class Snapshots(Hook):
    """Copies of the model's and the optimizer's whole state at the end of the given steps."""

    def __init__(self, *steps: int) -> None:
        self.steps = steps
        self.taken: dict[int, dict[str, Any]] = {}

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.state.step in self.steps:
            self.taken[trainer.state.step] = {
                "model": copy.deepcopy(trainer.model.state_dict()),
                "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit for bit: every weight, and every optimizer state (AdamW's step count and both moments)."""
    assert a["model"].keys() == b["model"].keys()
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i, st in sa.items():
        assert st.keys() == sb[i].keys()
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), (i, k)


def _fit(run_dir: Path, *extra: str, hooks: tuple[Hook, ...] = ()) -> tuple[Any, list[dict[str, Any]]]:
    trainer, _ = build_trainer(_cfg(run_dir, *extra))
    trainer.hooks.extend(hooks)
    return trainer, trainer.fit()


def _finite_weights(trainer: Any) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_a_nan_gradient_skips_the_step_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, clean = _fit(tmp_path / "clean", "--train.steps=3")  # (steps 1-2 see update 1's rate alone, as below)
    monkeypatch.setenv("TPLUS_FAULT", "grad:nan:step=3")  # one gradient element on this rank, during the backward
    snaps = Snapshots(2, 3, 4)
    trainer, history = _fit(tmp_path / "fault", hooks=(snaps,))
    # steps 1-2 are the clean run's
    assert [(m["loss"], m["grad_norm"]) for m in history[:2]] == [(m["loss"], m["grad_norm"]) for m in clean[:2]]
    assert [m["skipped"] for m in history] == [False, False, True, False, False]
    assert [m["skipped_steps"] for m in history] == [0, 0, 1, 1, 1]
    bad = history[2]
    assert math.isfinite(bad["loss"]) and math.isnan(bad["grad_norm"]) and "grad_norm nan" in bad["skip_reason"]
    assert_same_state(snaps.taken[2], snaps.taken[3])  # step 3 changed nothing, Adam's step count included
    # the clocks went on: step 3 consumed its batch and its learning rate
    assert [m["last_sample"] for m in history] == [3, 7, 11, 15, 19]
    assert history[2]["lr"] != history[1]["lr"] != history[3]["lr"]
    # and training goes on, finite
    changed = [n for n, t in snaps.taken[4]["model"].items() if not torch.equal(t, snaps.taken[3]["model"][n])]
    assert len(changed) == len(snaps.taken[4]["model"])
    assert _finite_weights(trainer) and all(math.isfinite(m["loss"] + m["grad_norm"]) for m in history[3:])


def test_a_non_finite_loss_skips_the_step(tmp_path: Path) -> None:
    trainer, _ = build_trainer(_cfg(tmp_path))
    real = trainer.loss_fn

    def loss_nan_at_step_3(logits: torch.Tensor, targets: torch.Tensor) -> Any:
        loss, parts = real(logits, targets)
        if trainer.state.step == 2:  # computing step 3: the value is nan, the gradient stays the real one
            loss = loss + torch.full_like(loss.detach(), math.nan)
        return loss, parts

    trainer.loss_fn = loss_nan_at_step_3
    snaps = Snapshots(2, 3)
    trainer.hooks.append(snaps)
    history = trainer.fit()
    assert [m["skipped"] for m in history] == [False, False, True, False, False]
    assert math.isnan(history[2]["loss"]) and math.isfinite(history[2]["grad_norm"])
    assert history[2]["skip_reason"] == "loss nan (not finite)"
    assert_same_state(snaps.taken[2], snaps.taken[3])
    assert _finite_weights(trainer) and history[-1]["skipped_steps"] == 1


def test_consecutive_skips_stop_the_run_and_nothing_damaged_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPLUS_FAULT", "grad:nan:step=3,grad:nan:step=4,grad:nan:step=5")
    cfg = _cfg(
        tmp_path / "run",
        "--train.steps=8",
        "--train.max_consecutive_skips=3",
        "--checkpoint.interval_steps=1",
        "--checkpoint.keep_last=100",
    )
    with pytest.raises(SkippedStepsError, match=r"train\.max_consecutive_skips \(3\): steps 3 to 5 .*grad_norm nan"):
        train(cfg)
    root = checkpoint_root(cfg, tmp_path / "run")
    steps = sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*"))
    assert steps == [1, 2, 3, 4]  # nothing of the failing step 5
    assert find_checkpoint(root).path.name == "step_00000004"
    saved = {s: checkpoint_parameters(root / f"step_{s:08d}") for s in steps}
    for s, params in saved.items():
        assert all(bool(torch.isfinite(t).all()) for t in params.values()), s
        if s > 2:  # the skipped steps' weights are step 2's
            assert all(torch.equal(t, saved[2][n]) for n, t in params.items()), s


def test_a_save_refuses_non_finite_weights_naming_the_parameter(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--train.steps=1", "--schedule.warmup_steps=0")
    trainer, run_dir = build_trainer(cfg)
    trainer.fit()
    manager = CheckpointManager(cfg, checkpoint_root(cfg, run_dir))
    first = manager.save(trainer).path
    with torch.no_grad():
        dict(trainer.model.named_parameters())["layers.1.mlp.w_down.weight"].view(-1)[7] = math.inf
    trainer.state.step = 2
    with pytest.raises(CheckpointError, match=r"parameter layers\.1\.mlp\.w_down\.weight holds nan or inf"):
        manager.save(trainer)
    assert find_checkpoint(manager.root).path == first
    assert not (manager.root / "step_00000002").exists()


def spike_rule(losses: list[float], norms: list[float], window: int, sigmas: float) -> tuple[list[bool], list[Any]]:
    """OLMo-core's rule recomputed with numpy from the logged series: skip when the loss or the gradient norm is more
    than ``sigmas`` sample standard deviations above the mean of the previous ``window`` finite steps, once at least
    max(2, window // 2) are there; non-finite steps are skipped and enter no window. Also each step's (loss, norm)
    sigmas where the rule acts."""
    seen_l: list[float] = []
    seen_n: list[float] = []
    skipped, z = [], []
    for loss, norm in zip(losses, norms, strict=True):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            skipped.append(True)
            z.append(None)
            continue
        if len(seen_l) >= max(2, window // 2):
            wl, wn = np.array(seen_l[-window:]), np.array(seen_n[-window:])
            ml, sl, mn, sn = wl.mean(), wl.std(ddof=1), wn.mean(), wn.std(ddof=1)
            skipped.append(bool(loss - ml > sigmas * sl or norm - mn > sigmas * sn))
            z.append(((loss - ml) / sl, (norm - mn) / sn))
        else:
            skipped.append(False)
            z.append(None)
        seen_l.append(loss)
        seen_n.append(norm)
    return skipped, z


def test_the_spike_rule_skips_what_a_numpy_recomputation_picks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPLUS_FAULT", "grad:scale1000:step=10")  # a gradient-norm spike, the loss as it is
    window, sigmas = 6, 3.0
    spike = ["--train.skip_spikes=true", f"--train.spike_window={window}", f"--train.spike_sigmas={sigmas}"]
    trainer, _ = build_trainer(_cfg(tmp_path, "--train.steps=14", "--train.max_consecutive_skips=14", *spike))
    real = trainer.loss_fn

    def loss_spike_at_step_12(logits: torch.Tensor, targets: torch.Tensor) -> Any:
        loss, parts = real(logits, targets)
        return (loss + 10.0 if trainer.state.step == 11 else loss), parts  # the value jumps, the gradient does not

    trainer.loss_fn = loss_spike_at_step_12
    history = trainer.fit()
    losses, norms = [m["loss"] for m in history], [m["grad_norm"] for m in history]
    expected, z = spike_rule(losses, norms, window, sigmas)
    assert [m["skipped"] for m in history] == expected
    assert expected[9] and expected[11] and not all(expected[3:])  # the two injected spikes, and not every step
    assert "grad_norm spike" in history[9]["skip_reason"] and "loss spike" in history[11]["skip_reason"]
    assert [m["skipped_steps"] for m in history] == list(np.cumsum(expected))
    for m, zz in zip(history, z, strict=True):  # the logged sigmas are the rule's
        got = None if m.get("loss_sigmas") is None else (m["loss_sigmas"], m["grad_norm_sigmas"])
        assert (got is None) == (zz is None), m["step"]
        if got is not None:
            assert got == pytest.approx(zz, rel=1e-9), m["step"]


def test_a_resumed_run_keeps_the_skip_count_and_the_spike_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # step 2 skipped (nan) before the stop at 4; the spike at 7 is caught only with steps 1, 3, 4 still in the window
    # (window 6: the rule needs 3 earlier steps; a resumed run that lost them would have 5 and 6 only)
    monkeypatch.setenv("TPLUS_FAULT", "grad:nan:step=2,grad:scale1000:step=7")
    spike = ["--train.skip_spikes=true", "--train.spike_window=6", "--train.spike_sigmas=6"]
    report = verify_resume(_cfg(tmp_path / "cfg", *spike), steps=8, at=4, work_dir=tmp_path)
    assert report.matches, report.text()
    rows = read_metrics(tmp_path / "resumed")
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, False, True, False]
    assert rows[-1]["skipped_steps"] == 2
