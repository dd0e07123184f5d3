"""Per-sequence labels, from `tplus prepare --labels` through the loader to the conditioned model (model.adaln)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.unit.test_prepare import read_split
from tplus_dist.cli import main as cli_main
from tplus_dist.config import ConfigError, RunConfig, load_config
from tplus_dist.data.loader import EvalBatches, ShardBatches, open_split
from tplus_dist.data.order import BatchRamp
from tplus_dist.data.prepare import InputError, PrepareError, prepare, verify_shards
from tplus_dist.train.trainer import Trainer

SEQ = 32
# each label's documents use their own letters, so a sample's text tells which labels it mixes
ALPHABETS = {"web": "abcdefgh", "code": "ijklmnop", "books": "qrstuvwx"}


def documents(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = rng.choice(sorted(ALPHABETS))
        out.append(("".join(rng.choice(ALPHABETS[name]) for _ in range(rng.randint(5, 70))), name))
    return out


def write_inputs(root: Path) -> list[str]:
    """A .jsonl and a .parquet file whose documents carry a ``src`` field (label names)."""
    root.mkdir(parents=True, exist_ok=True)
    a = documents(300, 1)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "src": s}) + "\n" for t, s in a))
    b = documents(200, 2)
    pq.write_table(pa.table({"text": [t for t, _ in b], "src": [s for _, s in b]}), root / "b.parquet")
    return [str(root / "a.jsonl"), str(root / "b.parquet")]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labeled")
    prepare(write_inputs(root / "in"), "bytes", SEQ, root / "out", val_fraction=0.2, labels="field:src", progress=False)
    return root / "out"


def test_field_labels_pack_each_label_apart(labeled: Path, tmp_path: Path) -> None:
    m = verify_shards(labeled)
    lab = m["labels"]
    assert lab["source"] == "field:src" and lab["column"] == "label" and m["columns"]["label"] == "int32"
    first = documents(300, 1)
    assert lab["names"] == list(dict.fromkeys(s for _, s in first))  # numbered in order of first appearance
    for split in ("train", "val"):
        samples = read_split(labeled, split, tmp_path)
        assert len(samples) == m["splits"][split]["samples"]
        counts = [0] * lab["count"]
        for sample in samples:
            label = int(sample["label"])
            counts[label] += 1
            text = bytes(t for t in sample["tokens"].tolist() if t < 256).decode()
            assert set(text) <= set(ALPHABETS[lab["names"][label]]), (label, text)  # never two labels in a sample
        assert counts == lab["splits"][split]["samples"] and min(counts) > 0
        assert sum(lab["splits"][split]["documents"]) == m["splits"][split]["documents"]


def test_input_labels_named_on_the_command_line_equal_the_api_with_workers(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    argv = ["prepare", "--input", *inputs, "--tokenizer", "bytes", "--seq-len", str(SEQ), "--no-progress"]
    assert cli_main([*argv, "--out", str(tmp_path / "cli"), "--labels", "input", "--label-names", "a,b"]) == 0
    api = prepare(inputs, "bytes", SEQ, tmp_path / "api", labels="input", label_names=["a", "b"], workers=2)
    cli = verify_shards(tmp_path / "cli")
    assert cli["labels"]["names"] == ["a", "b"] and cli["labels"]["source"] == "input"
    assert [s["sha256"] for s in cli["splits"]["train"]["shards"]] == [
        s["sha256"] for s in api["splits"]["train"]["shards"]
    ]  # the same bytes with one or two tokenizer processes
    samples = read_split(tmp_path / "cli", "train", tmp_path)
    assert sorted({int(s["label"]) for s in samples}) == [0, 1]
    assert cli["labels"]["splits"]["train"]["documents"] == [300, 200]


def test_integer_labels_are_ids(tmp_path: Path) -> None:
    rows = [{"text": "x" * 40, "domain": 4}, {"text": "y" * 90, "domain": 0}, {"text": "z" * 50, "domain": 4}]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare([str(tmp_path / "i.jsonl")], "bytes", 16, tmp_path / "out", labels="field:domain", progress=False)
    assert m["labels"]["count"] == 5 and m["labels"]["names"] == ["0", "1", "2", "3", "4"]
    assert m["labels"]["splits"]["train"]["documents"] == [1, 0, 0, 0, 2]
    assert {int(s["label"]) for s in read_split(tmp_path / "out", "train", tmp_path)} == {0, 4}


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ([{"text": "a", "src": "web"}, {"text": "b", "src": 3}], {}, "i.jsonl:2: label field 'src' holds the integer"),
        ([{"text": "a", "src": "web"}, {"text": "b"}], {}, "i.jsonl:2: no label field 'src'"),
        ([{"text": "a", "src": 1.5}], {}, "i.jsonl:1: label field 'src' is float"),
        ([{"text": "a", "src": True}], {}, "i.jsonl:1: label field 'src' is bool"),
        ([{"text": "a", "src": -1}], {}, "i.jsonl:1: label field 'src' is -1"),
        ([{"text": "a", "src": None}], {}, "i.jsonl:1: label field 'src' is null"),
        ([{"text": "a", "src": "news"}], {"label_names": ["web"]}, "holds 'news', not one of --label-names"),
        ([{"text": "a", "src": 2}], {"label_names": ["web", "code"]}, "outside --label-names (0 .. 1)"),
        ([{"text": "a", "src": "web"}], {"labels": "domain"}, "--labels must be `input` or `field:NAME`"),
        ([{"text": "a", "src": "web"}], {"labels": "input", "label_names": ["x", "y"]}, "one per --input (1)"),
        ([{"text": "a", "src": "web"}], {"label_names": ["x", "x"]}, "a name is listed twice"),
        ([{"text": "a", "src": "web"}], {"labels": None, "label_names": ["x"]}, "--label-names needs --labels"),
    ],
)
def test_bad_labels_are_named(
    tmp_path: Path, rows: list[dict[str, object]], options: dict[str, Any], message: str
) -> None:
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = {"labels": "field:src", **options}
    with pytest.raises(PrepareError, match=re.escape(message)):
        prepare([str(tmp_path / "i.jsonl")], "bytes", 4, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_field_labels_need_fields(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("a document")
    with pytest.raises(InputError, match=r"d\.txt: a \.txt file has no fields to read the label 'src' from"):
        prepare([str(tmp_path / "d.txt")], "bytes", 4, tmp_path / "out", labels="field:src", progress=False)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p\.parquet: no label column 'src' \(columns: text\)"):
        prepare([str(tmp_path / "p.parquet")], "bytes", 4, tmp_path / "out", labels="field:src", progress=False)


def test_loader_carries_each_samples_label(labeled: Path, tmp_path: Path) -> None:
    stored = {split: [int(s["label"]) for s in read_split(labeled, split, tmp_path)] for split in ("train", "val")}
    loader = ShardBatches(
        open_split(str(labeled), "train", tmp_path / "cache"), SEQ, 4, BatchRamp(end=8), seed=3, labels=True
    )
    for _ in range(3):
        for mb in loader.next_step().micro_batches:
            assert mb.labels is not None and mb.labels.dtype == torch.int64
            assert mb.labels.tolist() == [stored["train"][int(i)] for i in loader.order.indices(mb.positions)]
    val = list(EvalBatches(open_split(str(labeled), "val", tmp_path / "cache"), SEQ, 4, 8, labels=True))
    assert [lab for mb in val for lab in (mb.labels.tolist() if mb.labels is not None else [])] == stored["val"][:8]
    plain = ShardBatches(open_split(str(labeled), "train", tmp_path / "cache"), SEQ, 4, BatchRamp(end=4), seed=3)
    assert plain.next_step().micro_batches[0].labels is None  # read only when asked


def _config(labeled: Path, tmp_path: Path, *extra: str) -> RunConfig:
    return load_config("configs/tiny.yaml", _config_args(labeled, tmp_path, *extra))


def _config_args(labeled: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"--model.seq_len={SEQ}",
        "--train.steps=3",
        "--schedule.warmup_steps=1",  # (tiny's 20-step warmup would outlast the run: refused)
        "--train.micro_batch_size=4",
        "--train.eval_interval=3",
        "--train.eval_samples=8",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--checkpoint.interval_steps=0",
        "--checkpoint.at_end=false",
        f"--data.shards={labeled}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--log.run_dir={tmp_path / 'run'}",
        "--model.adaln=adaln_zero",
        "--model.n_conditions=3",
        *extra,
    ]


def _ada(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.endswith(".ada.weight")}


def test_training_feeds_the_labels_to_the_conditioned_model(labeled: Path, tmp_path: Path) -> None:
    from tplus_dist.train.run import build_trainer

    trainer, _ = build_trainer(_config(labeled, tmp_path))
    history = trainer.fit()
    assert all(np.isfinite(m["loss"]) for m in history) and np.isfinite(history[-1]["val_loss"])
    assert all(w.abs().sum() > 0 for w in _ada(trainer).values())  # zero at init: moved only by labelled steps
    off, _ = build_trainer(_config(labeled, tmp_path, "--data.labels=false", f"--log.run_dir={tmp_path}/off"))
    unlabeled = off.fit()
    assert all(w.abs().sum() == 0 for w in _ada(off).values())  # no label: the plain model, exactly
    assert history[0]["loss"] == unlabeled[0]["loss"]  # adaLN-Zero starts as the plain model ...
    assert history[-1]["loss"] != unlabeled[-1]["loss"]  # ... and the labels change it once it has trained


def test_labels_are_checked_before_the_run_starts(
    labeled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tplus_dist.train.run import build_trainer

    with pytest.raises(ConfigError, match=r"model\.n_conditions: \(2\) is smaller than the 3 labels \(field:src\)"):
        build_trainer(_config(labeled, tmp_path, "--model.n_conditions=2"))
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(ConfigError, match=r"data\.labels: is true, but the model takes no label"):
        _config(labeled, tmp_path, "--model.adaln=none", "--model.n_conditions=0", "--data.labels=true").validate()
    plain = tmp_path / "plain"
    # (with a validation split: the config evaluates, and an eval_interval without one is refused)
    prepare(write_inputs(tmp_path / "in"), "bytes", SEQ, plain, val_fraction=0.3, progress=False)
    with pytest.raises(ConfigError, match=r"data\.labels: is true, but the shards at .* carry no labels"):
        build_trainer(_config(plain, tmp_path, "--data.labels=true"))
    build_trainer(_config(plain, tmp_path))  # null: trains unconditioned, and says so
    assert "carry no labels: every sequence trains unconditioned" in capsys.readouterr().out


def test_a_labeled_run_resumes_bit_for_bit(labeled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tplus_dist.cli import main

    args = [a for a in _config_args(labeled, tmp_path) if not a.startswith(("--train.steps", "--checkpoint."))]
    rc = main(["verify-resume", "configs/tiny.yaml", *args, "--steps", "4", "--at", "2", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "the continuation matches bit for bit (4 steps" in out, out
