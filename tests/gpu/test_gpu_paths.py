"""The GPU paths of the training system that CPU tests cannot reach: DeepSpeed bf16 ZeRO 1 on NCCL, torch.compile on
CUDA, a background (pinned-memory) save resumed bit for bit with the CUDA generator restored, and `tplus train` on
CUDA end to end. Small models and few steps: the file takes about a minute and a half on an H100/H200. Skipped
without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tplus_dist.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu

BF16_REL = 2e-2
"""Relative difference two bf16-autocast computations of the same loss may show: bf16 keeps 8 significant bits
(unit roundoff 2^-9 = 2e-3), and a fused (compiled) kernel rounds its intermediates at other points than eager
kernels do, a few roundings deep; a few steps of training on top let the difference grow a little."""


def _tiny(tmp: Path, *extra: str) -> RunConfig:
    """configs/tiny.yaml (0.8M parameters, pydoc bytes) on CUDA, in ``tmp``, without console or tensorboard."""
    return load_config(
        ROOT / "configs/tiny.yaml",
        [
            "--train.device=cuda",
            "--train.eval_interval=0",
            f"--data.cache_dir={ROOT / '.cache/tplus'}",
            f"--log.run_dir={tmp}",
            "--log.progress=false",
            "--log.tensorboard=false",
            "--checkpoint.resume=none",
            *extra,
        ],
    )


def _history_losses(history: list[dict[str, Any]]) -> list[float]:
    return [float(r["loss"]) for r in history if "loss" in r]


# ------------------------------------------------------------------------------ DeepSpeed bf16 ZeRO 1 on NCCL


def _deepspeed_worker(rank: int, world: int, out: str) -> None:
    """One NCCL rank: three steps of the tiny model through a bf16 ZeRO 1 engine, beside the same steps in plain
    PyTorch (fp32 parameters, bf16 autocast, AdamW); writes both loss sequences and the engine's settings."""
    import torch.nn.functional as F

    from tplus_dist.model import build_model, lm_loss
    from tplus_dist.optim import build_optimizer
    from tplus_dist.parallel import DeepSpeedMPU, ParallelDims, destroy_process_groups, init_process_groups
    from tplus_dist.parallel.engine import EngineStep, build_engine, deepspeed_config

    groups = init_process_groups(ParallelDims(tp=1, pp=1, world_size=world, zero_stage=1), backend="nccl")
    try:
        cfg = load_config(ROOT / "configs/tiny.yaml", ["--parallel.zero_stage=1", "--precision.dtype=bf16",
                                                     "--train.micro_batch_size=8"])  # fmt: skip
        device = torch.device("cuda", torch.cuda.current_device())
        g = torch.Generator().manual_seed(3)
        n, seq = 8, cfg.model.seq_len
        batches = [torch.randint(0, cfg.model.vocab_size, (n, seq + 1), generator=g) for _ in range(3)]

        torch.manual_seed(cfg.train.seed)
        ref = build_model(cfg.model).to(device)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(device)
        opt = build_optimizer(ref, cfg.optim, cfg.model)
        ref_losses = []
        for b in batches:
            b = b.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = ref(b[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref_losses.append(float(loss))

        engine = build_engine(model, build_optimizer(model, cfg.optim, cfg.model),
                              deepspeed_config(cfg, dp=world, device="cuda"), mpu=DeepSpeedMPU(groups))  # fmt: skip

        def loss_fn(eng: Any, mb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return lm_loss(eng(mb[0]), mb[1])[0]

        stepper = EngineStep(engine, loss_fn)
        losses, norms = [], []
        for b in batches:
            b = b.to(device)
            out_step = stepper.run_step([(b[:, :-1], b[:, 1:])])
            losses.append(out_step.loss)
            norms.append(out_step.grad_norm)
        info = {
            "ref": ref_losses,
            "engine": losses,
            "norms": norms,
            "bf16": bool(engine.bfloat16_enabled()),
            "stage": int(engine.zero_optimization_stage()),
            "backend": torch.distributed.get_backend(),
            "param_dtype": str(next(engine.module.parameters()).dtype),
        }
        engine.destroy()
        Path(out, "deepspeed.json").write_text(json.dumps(info))
    finally:
        destroy_process_groups()


def test_deepspeed_bf16_zero1_on_nccl(tmp_path: Path) -> None:
    """A one-process DeepSpeed engine (bf16, ZeRO 1) on NCCL trains as plain PyTorch with bf16 autocast does: the
    first step's loss (same weights, same batch) within bf16 tolerance, the next two close, every norm finite."""
    pytest.importorskip("deepspeed")
    from tplus_dist.spawn import run_distributed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))
    run_distributed(_deepspeed_worker, 1, str(tmp_path))
    info = json.loads((tmp_path / "deepspeed.json").read_text())
    assert info["bf16"] and info["stage"] == 1 and info["backend"] == "nccl", info
    assert info["param_dtype"] == "torch.bfloat16", info  # DeepSpeed's bf16 mode holds bf16 weights
    assert all(math.isfinite(x) for x in info["norms"]), info
    for step, (a, b) in enumerate(zip(info["engine"], info["ref"], strict=True), 1):
        # bf16 weights (the engine) against fp32 weights under autocast: the first step differs by rounding only
        assert abs(a - b) <= BF16_REL * abs(b) * step, (step, info)


# -------------------------------------------------------------------------------------- torch.compile on and off


def test_compile_matches_eager(tmp_path: Path) -> None:
    """Five steps of `tplus train` with train.compile on and off, bf16 on CUDA: every step's loss within bf16
    tolerance of the eager run's, and the first step's (the same weights and batch) closer still."""
    from tplus_dist.train.run import train

    common = ["--train.steps=5", "--model.n_layers=2", "--checkpoint.at_end=false"]
    _, eager = train(_tiny(tmp_path / "eager", *common, "--train.compile=false"))
    _, compiled = train(_tiny(tmp_path / "compiled", *common, "--train.compile=true"))
    a, b = _history_losses(compiled), _history_losses(eager)
    assert len(a) == len(b) == 5
    assert abs(a[0] - b[0]) <= BF16_REL / 2 * b[0], (a, b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= BF16_REL * y, (a, b)


# --------------------------------------------------------------------- background save, resume bit for bit, CUDA RNG


def _resume_main(tmp: str) -> None:
    """The body of :func:`test_background_save_resumes_bit_for_bit`, in a fresh process: deterministic CUDA kernels
    (embedding and attention backward otherwise add in a varying order; cuBLAS needs CUBLAS_WORKSPACE_CONFIG set
    before it starts), so that any difference is the checkpoint's."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    from tplus_dist.parallel.state import full_state_dict
    from tplus_dist.train.metrics import read_metrics
    from tplus_dist.train.run import build_trainer

    tmp_path = Path(tmp)
    common = ["--train.steps=6", "--checkpoint.interval_steps=4", "--checkpoint.background=true",
              "--checkpoint.at_end=false", "--model.resid_dropout=0.1", "--model.attn_dropout=0.1"]  # fmt: skip
    whole_dir = tmp_path / "whole"
    trainer, _ = build_trainer(_tiny(whole_dir, *common))
    try:
        whole = trainer.fit()
    finally:
        trainer.close()  # waits for the background writer
    whole_params = full_state_dict(trainer.model)
    # a background save logs only the loop's stall; a foreground one also checkpoint_s (checkpoint/hook.py)
    saved_row = next(r for r in read_metrics(whole_dir) if int(r["step"]) == 4)
    assert "checkpoint_stall_s" in saved_row and "checkpoint_s" not in saved_row, saved_row

    ckpts = whole_dir / "checkpoints"
    trainer_files = sorted(ckpts.rglob("trainer/rank00000.pt"))
    assert len(trainer_files) == 1, trainer_files
    saved_cuda = torch.load(trainer_files[0], map_location="cpu", weights_only=True)["rng"]["cuda"]
    assert saved_cuda, "the checkpoint holds no CUDA generator state"
    device = torch.cuda.current_device()

    torch.cuda.manual_seed(12345)  # a generator state the resume must overwrite
    fresh = torch.cuda.get_rng_state()
    assert not torch.equal(fresh, saved_cuda[device])  # so the comparison below can fail
    resumed_trainer, _ = build_trainer(_tiny(tmp_path / "resumed", *common, f"--checkpoint.resume={ckpts}"))
    try:
        assert resumed_trainer.state.step == 4
        assert torch.equal(torch.cuda.get_rng_state(), saved_cuda[device]), "the CUDA generator was not restored"
        rest = resumed_trainer.fit()
    finally:
        resumed_trainer.close()
    resumed_params = full_state_dict(resumed_trainer.model)
    after = [r for r in whole if int(r["step"]) > 4]
    assert len(after) == len(rest) == 2, (after, rest)
    for a, b in zip(after, rest, strict=True):
        assert int(a["step"]) == int(b["step"])
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    assert whole_params.keys() == resumed_params.keys()
    for name, p in whole_params.items():
        assert torch.equal(p, resumed_params[name]), name


def test_background_save_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Six steps uninterrupted, with a background save after step 4 (the pinned-memory host copy, the writer
    thread); then a fresh trainer resumed from that checkpoint runs steps 5 and 6. With dropout on, the CUDA
    generator decides every mask, so steps 5-6 (loss, gradient norm) and the final parameters are equal bit for bit
    only if the checkpoint restored it; the restored state is also compared directly with the saved one."""
    code = f"from tests.gpu.test_gpu_paths import _resume_main; _resume_main({str(tmp_path)!r})"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------- tplus train end to end


def test_tplus_train_on_cuda(tmp_path: Path) -> None:
    """`tplus train configs/tiny.yaml` on CUDA as a user starts it: exits 0, says it trains on cuda, the loss falls
    and the final checkpoint is published."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tplus_dist", "train", str(ROOT / "configs/tiny.yaml"), "--train.steps=40",
           "--train.device=cuda", "--train.eval_interval=20", "--log.progress=false", "--log.tensorboard=false",
           f"--log.run_dir={run_dir}", f"--data.cache_dir={ROOT / '.cache/tplus'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "on cuda" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert list((run_dir / "checkpoints").rglob("manifest.json")), "no checkpoint was published"
