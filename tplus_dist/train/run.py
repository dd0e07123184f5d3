"""`tplus train`: everything a single-process run needs, built from one RunConfig."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tplus_dist.config import ConfigError, RunConfig
from tplus_dist.data import HFTokenizer, Tokenizer, TokenStream, build_tokenizer, read_documents, tokenize_documents
from tplus_dist.model import build_model
from tplus_dist.optim import build_optimizer, build_scheduler
from tplus_dist.train.hooks import ConsoleHook, EvalHook, MetricsFileHook
from tplus_dist.train.metrics import MetricsWriter, device_peak_flops
from tplus_dist.train.trainer import Trainer


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was asked for but torch sees no CUDA device")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream


def build_data(cfg: RunConfig) -> Data:
    """Read, tokenize and split the corpus; checks the tokenizer fits the model before any work is saved."""
    docs = read_documents(cfg.data.source)
    tokenizer = build_tokenizer(cfg.data.tokenizer, docs)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}, "
            f"data.tokenizer={cfg.data.tokenizer})",
        )
    tokens = tokenize_documents(docs, tokenizer)
    n_val = max(int(len(tokens) * cfg.data.val_fraction), cfg.seq_len + 2)
    if len(tokens) - n_val < cfg.seq_len + 2:
        raise ValueError(f"data.source: {len(tokens)} tokens is too little text for seq_len {cfg.seq_len}")
    # validation is the tail: no training window overlaps it
    train = TokenStream(tokens[:-n_val], cfg.seq_len, seed=cfg.train.seed)
    val = TokenStream(tokens[-n_val:], cfg.seq_len, seed=cfg.train.seed + 1)
    return Data(tokenizer, train, val)


def make_run_dir(cfg: RunConfig) -> Path:
    """A fresh directory: an existing run is never overwritten (a suffix -1, -2, ... is added)."""
    base = Path(cfg.log.run_dir.format(name=cfg.log.name))
    path, i = base, 0
    while path.exists() and any(path.iterdir()):
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def train(cfg: RunConfig, run_dir: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Train as configured; returns the run directory and the per-step metrics."""
    cfg.validate()
    device = resolve_device(cfg.train.device)
    torch.set_num_threads(int(os.environ.get("TPLUS_NUM_THREADS", torch.get_num_threads())))
    seed_everything(cfg.train.seed)
    data = build_data(cfg)  # every input is checked before anything is written
    run_dir = run_dir or make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if isinstance(data.tokenizer, HFTokenizer):
        data.tokenizer.save(run_dir / "tokenizer.json")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim, cfg.train.steps)
    writer = MetricsWriter(run_dir, tensorboard=cfg.log.tensorboard)
    hooks = [
        EvalHook(cfg.train.eval_interval),
        MetricsFileHook(writer),
        ConsoleHook(cfg.train.log_interval, progress=cfg.log.progress),
    ]
    trainer = Trainer(
        cfg,
        model,
        optimizer,
        scheduler,
        data.train,
        data.val,
        device,
        hooks,
        peak_flops=device_peak_flops(device, cfg.log.peak_tflops),
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"tplus: {n / 1e6:.2f}M parameters on {device}; writing {run_dir}", flush=True)
    history = trainer.fit()
    return run_dir, history
