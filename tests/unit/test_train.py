"""The single-process run: loss falls, runs are reproducible, outputs are plottable, bad input writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tplus_dist.cli import main
from tplus_dist.config import load_config
from tplus_dist.train.metrics import read_metrics
from tplus_dist.train.run import train

FAST = [
    "--train.steps=30",
    "--train.micro_batch_size=8",
    "--train.eval_interval=15",
    "--train.eval_samples=16",
    "--model.seq_len=64",
    "--log.progress=false",
    "--schedule.warmup_steps=5",
]


CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tplus-tests"


def _fast(*extra: str) -> list[str]:
    """FAST, then ``extra``, without what ``extra`` makes dead in FAST (a setting that has no effect is refused): the
    step warmup on the token clock, eval_samples without evaluation; on a short run the warmup shrinks below it."""
    given = dict(a.split("=", 1) for a in extra if "=" in a)
    steps = int(given.get("--train.steps", "30"))
    out = []
    for a in FAST:
        if a.startswith("--schedule.warmup_steps="):
            a = f"--schedule.warmup_steps={0 if given.get('--schedule.unit') == 'tokens' else min(5, steps - 1)}"
        if a.startswith("--train.eval_samples=") and given.get("--train.eval_interval") == "0":
            continue
        out.append(a)
    return [*out, *extra]


def _cfg(tmp_path: Path, *extra: str):
    # one prepared corpus (pydoc, bytes, seq 64) shared by the tests: prepared on first use, then reused
    return load_config(
        "configs/tiny.yaml", _fast(f"--log.run_dir={tmp_path}/{{name}}", f"--data.cache_dir={CACHE}", *extra)
    )


def test_tiny_preset_loss_falls(tmp_path: Path) -> None:
    _run_dir, history = train(_cfg(tmp_path))
    losses = [m["loss"] for m in history]
    assert len(losses) == 30
    # byte-level text starts near ln(257) = 5.55; 30 steps must cut it clearly
    assert losses[0] > 4.5
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    vals = [m["val_loss"] for m in history if "val_loss" in m]
    assert len(vals) == 2 and vals[-1] < vals[0]


def test_same_seed_gives_identical_losses(tmp_path: Path) -> None:
    _, a = train(_cfg(tmp_path / "a", "--train.steps=8"))
    _, b = train(_cfg(tmp_path / "b", "--train.steps=8"))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    _, c = train(_cfg(tmp_path / "c", "--train.steps=8", "--train.seed=7"))
    assert [m["loss"] for m in a] != [m["loss"] for m in c]


def test_grad_accum_equals_larger_micro_batch_in_expectation_of_tokens(tmp_path: Path) -> None:
    _, h = train(_cfg(tmp_path, "--train.steps=3", "--train.grad_accum=2", "--train.micro_batch_size=4"))
    assert [m["batch_size"] for m in h] == [8, 8, 8]
    assert [m["tokens"] for m in h] == [8 * 64, 16 * 64, 24 * 64]


def test_run_directory_has_config_metrics_and_tensorboard(tmp_path: Path) -> None:
    run_dir, _history = train(_cfg(tmp_path, "--train.steps=4", "--train.eval_interval=2"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "time/step",
        "time/data",
        "batch_size",
        "first_sample",
        "last_sample",
    ):
        assert all(key in r for r in rows), key
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    # where time goes: the step's throughput from its own time, evaluation and the final save timed apart
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 64 / r["time/step"], rel=1e-9)
        assert r["time/data"] >= 0 and r["time/step"] > 0
    assert [("time/eval" in r) for r in rows] == [False, True, False, True]
    assert "time/checkpoint" in rows[3] and rows[3]["time/checkpoint"] == rows[3]["checkpoint_stall_s"]
    assert [(r["first_sample"], r["last_sample"]) for r in rows] == [(0, 7), (8, 15), (16, 23), (24, 31)]
    assert load_config(run_dir / "config.yaml").train.steps == 4  # the resolved config reloads
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    first, _ = train(_cfg(tmp_path, "--train.steps=2"))
    before = (first / "metrics.jsonl").read_text()
    # the same command finds the finished run (its checkpoint) and does nothing
    again, history = train(_cfg(tmp_path, "--train.steps=2"))
    assert again == first and history == [] and not list(first.glob("config.resumed_*"))
    # a fresh start goes to a new directory
    second, _ = train(_cfg(tmp_path, "--train.steps=2", "--checkpoint.resume=none"))
    assert second != first and second.name == first.name + "-1"
    # a directory with files but no checkpoint is not resumed either
    third, _ = train(_cfg(tmp_path, "--train.steps=2", "--checkpoint.at_end=false", "--log.name=other"))
    fourth, _ = train(_cfg(tmp_path, "--train.steps=2", "--log.name=other"))
    assert fourth.name == third.name + "-1"
    assert (first / "metrics.jsonl").read_text() == before


def test_optimizers_and_schedules_train(tmp_path: Path) -> None:
    for extra in (
        ["--optim.name=adafactor", "--optim.lr=1e-2"],
        ["--optim.name=soap"],
        ["--schedule.name=wsd"],
        ["--optim.weight_decay_schedule=lr_squared"],
        ["--model.z_loss=1e-4"],
    ):
        _, h = train(_cfg(tmp_path / extra[0].split("=")[1], "--train.steps=12", *extra))
        assert h[-1]["loss"] < h[0]["loss"], extra


def test_cli_train_and_bad_config_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train",
        "configs/tiny.yaml",
        *_fast("--train.steps=2"),
        f"--log.run_dir={tmp_path}/ok",
        f"--data.cache_dir={CACHE}",
    ]
    assert main(args) == 0
    assert (tmp_path / "ok" / "metrics.jsonl").is_file()
    bad = ["train", "configs/tiny.yaml", "--model.n_kv_heads=3", f"--log.run_dir={tmp_path}/bad"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "model.n_kv_heads" in err and "divisible" in err
    assert not (tmp_path / "bad").exists()
    assert main(["train", "configs/tiny.yaml", "--optim.lr=-1", f"--log.run_dir={tmp_path}/bad"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_tokenizer_larger_than_vocab_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "configs/tiny.yaml",
        *FAST,
        "--model.vocab_size=100",
        f"--log.run_dir={tmp_path}/x",
        f"--data.cache_dir={CACHE}",
    ]
    assert main(args) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shards_of_another_seq_len_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = next(CACHE.glob("prepared/*/manifest.json"), None)
    if shards is None:
        train(_cfg(tmp_path / "prep", "--train.steps=1"))
        shards = next(CACHE.glob("prepared/*/manifest.json"))
    args = [
        "train",
        "configs/tiny.yaml",
        *FAST,
        "--model.seq_len=32",
        f"--data.shards={shards.parent}",
        f"--log.run_dir={tmp_path}/x",
    ]
    assert main(args) == 2
    assert "train.seq_len" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped mid-epoch at step 5 and resumed from its saved state, the run consumes the same samples and
    computes the same losses, bit for bit, as one that never stopped (CPU, fp32), across a growing batch."""
    import torch

    from tplus_dist.train.run import build_trainer

    ramp = [
        "--train.steps=12",
        "--train.micro_batch_size=4",
        "--train.grad_accum=3",
        "--train.batch_size_start=4",
        "--train.batch_size_increment=4",
        "--train.batch_ramp_tokens=2048",
        "--schedule.unit=tokens",
        "--schedule.warmup_tokens=1024",
        "--train.eval_interval=0",
    ]
    _, full = train(_cfg(tmp_path / "full", *ramp))
    trainer, _ = build_trainer(_cfg(tmp_path / "part", *ramp))
    head = trainer.fit(until=5)
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    del trainer
    resumed, _ = build_trainer(_cfg(tmp_path / "resumed", *ramp))
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    tail = resumed.fit()
    keys = ("loss", "lr", "grad_norm", "batch_size", "first_sample", "last_sample", "tokens")
    assert [[m[k] for k in keys] for m in head + tail] == [[m[k] for k in keys] for m in full]


def test_growing_batch_follows_its_schedule_and_the_token_clock(tmp_path: Path) -> None:
    ramp = [
        "--train.steps=10",
        "--train.micro_batch_size=2",
        "--train.grad_accum=4",
        "--train.batch_size_start=2",
        "--train.batch_size_increment=2",
        "--train.batch_ramp_tokens=1536",
        "--schedule.unit=tokens",
        "--schedule.warmup_tokens=2048",
        "--train.eval_interval=0",
    ]
    _, h = train(_cfg(tmp_path, *ramp))
    # +2 sequences every 512 tokens (8 sequences of 64) consumed, from 2 to 8
    expected, tokens = [], 0
    for _ in range(10):
        b = min(8, 2 + 2 * (tokens // 512))
        expected.append(b)
        tokens += b * 64
    assert [m["batch_size"] for m in h] == expected
    assert [m["tokens"] for m in h][-1] == tokens
    # warmup counts tokens: lr = peak * tokens_after / warmup_tokens while below warmup
    peak = 3e-3
    for m in h:
        if m["tokens"] < 2048:
            assert m["lr"] == pytest.approx(peak * m["tokens"] / 2048)


def test_growing_batch_needs_the_token_clock(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "config",
        "configs/tiny.yaml",
        "--train.grad_accum=4",
        "--train.batch_size_start=16",
        "--train.batch_size_increment=16",
        "--train.batch_ramp_tokens=1000",
    ]
    assert main(args) == 2
    assert "schedule.unit" in capsys.readouterr().err


def test_cli_surface_is_frozen(capsys: pytest.CaptureFixture[str]) -> None:
    """Other tools call these commands: changing them is a breaking change, so it must be deliberate."""
    from tplus_dist.cli import COMMANDS

    assert sorted(COMMANDS) == ["bench", "config", "export", "launch", "plan", "prepare", "train", "verify-resume"]
    assert main(["--help"]) == 0
    assert main(["nope"]) == 2


def test_config_command_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "configs/tiny.yaml", "--model.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 3" in out and "d_model: 128" in out


def test_config_command_prints_the_derived_fields_a_run_uses(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    overrides = ["--model.d_model=192", "--model.n_heads=6", "--model.d_ff=null", "--model.d_ff_multiple=64"]
    assert main(["config", "configs/tiny.yaml", *overrides]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    m = out["model"]
    # head_dim = 192 / 6 = 32; SwiGLU d_ff = 8/3 * 192 = 512, a multiple of 64 already; n_kv_heads as tiny.yaml sets
    assert (m["head_dim"], m["d_ff"], m["n_kv_heads"]) == (32, 512, 2)
    assert m["softmax_scale"] == pytest.approx(32**-0.5)
    assert out["train"]["seq_len"] == 128 and out["data"]["seed"] == out["train"]["seed"] == 1234
    assert out["schedule"]["decay_steps"] == 300  # cosine ends at train.steps
    assert None not in (m["head_dim"], m["d_ff"], m["n_kv_heads"], m["softmax_scale"])


def test_train_without_a_config_prints_the_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # before: it trained a 134M-parameter default model (preparing a corpus first)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "train needs a CONFIG file" in err and "commands:" in err
    assert main(["train", "--train.steps=3"]) == 2
    assert main(["verify-resume", "--steps", "4"]) == 2


def test_a_directory_given_as_the_config_is_named_as_a_directory(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path} is a directory, not a YAML file" in err and "does not exist" not in err


def test_data_paths_of_the_wrong_kind_are_named_as_such(tmp_path: Path, capsys) -> None:
    from tplus_dist.config import ConfigError
    from tplus_dist.data.tokenizers import build_tokenizer
    from tplus_dist.parallel.engine import load_deepspeed_overrides

    a_file = tmp_path / "shards.txt"
    a_file.write_text("x")
    args = _fast("--train.steps=2", f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}")
    assert main(["train", "configs/tiny.yaml", *args, f"--data.shards={a_file}"]) == 2
    assert f"data.shards: {a_file} is a file, not a directory written by `tplus prepare`" in capsys.readouterr().err
    assert main(["train", "configs/tiny.yaml", *args, f"--data.shards={tmp_path / 'none'}"]) == 2
    assert f"data.shards: {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is a directory, not a DeepSpeed JSON file"):
        load_deepspeed_overrides(str(tmp_path))
    with pytest.raises(ValueError, match=r"is a directory, not a tokenizer\.json"):
        build_tokenizer(str(tmp_path))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2"])
def test_a_model_split_on_one_process_is_refused_not_ignored(split: str, tmp_path: Path, capsys) -> None:
    # before: one process trained the whole model, the split silently unused
    args = _fast("--train.steps=2", f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}", split)
    assert main(["train", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert f"{split[2:].split('=')[0]}: (2) has no effect: it splits the model over 2 processes" in err
    assert "tplus launch --nproc-per-node 2" in err and not (tmp_path / "run").exists()


def test_a_file_given_to_resume_is_named_as_a_file(tmp_path: Path, capsys) -> None:
    not_a_checkpoint = tmp_path / "model.safetensors"
    not_a_checkpoint.write_bytes(b"x")
    args = _fast("--train.steps=2", f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}")
    assert main(["train", "configs/tiny.yaml", *args, f"--resume={not_a_checkpoint}"]) == 2
    assert f"{not_a_checkpoint} is a file, not a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_token_warmup_as_long_as_the_run_in_tokens_is_refused_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2 steps x micro-batch 8 x 64 tokens (one process) = 1024 tokens
    args = _fast("--train.steps=2", "--schedule.unit=tokens", "--schedule.warmup_tokens=1024",
                 f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}")  # fmt: skip
    assert main(["train", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "schedule.warmup_tokens: (1024) is at least the whole run (1024 tokens" in err
    assert not (tmp_path / "run").exists()


def test_an_eval_interval_without_a_validation_split_is_refused(tmp_path: Path, capsys) -> None:
    args = _fast("--train.steps=2", "--data.val_fraction=0", "--train.eval_interval=1",
                 f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}")  # fmt: skip
    assert main(["train", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert "train.eval_interval: (1) has no effect: the shards at " in err and "no validation split" in err
    assert not (tmp_path / "run").exists()
    # left at its default (100, so evaluated after the last step), no validation split: no val_loss at all, not nan
    args = _fast("--train.steps=2", "--data.val_fraction=0", "--train.eval_interval=100", "--train.eval_samples=null",
                 "--log.tensorboard=false",
                 f"--log.run_dir={tmp_path}/run", f"--data.cache_dir={CACHE}")  # fmt: skip
    assert main(["train", "configs/tiny.yaml", *args]) == 0
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and not any("val_loss" in r or "time/eval" in r for r in rows)


def test_metrics_lines_are_json(tmp_path: Path) -> None:
    run_dir, _ = train(_cfg(tmp_path, "--train.steps=2", "--log.tensorboard=false"))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert not (run_dir / "tensorboard").exists()


def test_training_from_an_s3_remote_equals_training_from_the_local_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path on a remote: manifest download, shard download into the cache, same samples, same losses."""
    import boto3
    from moto.server import ThreadedMotoServer

    _, local = train(_cfg(tmp_path / "local", "--train.steps=4"))
    shards = next(CACHE.glob("prepared/*/manifest.json")).parent
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "S3_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="corpus")
        for f in shards.rglob("*"):
            if f.is_file() and not f.name.endswith(".mds"):  # the compressed shards, as prepare wrote them
                s3.upload_file(str(f), "corpus", f"tiny/{f.relative_to(shards)}")
        _, remote = train(
            _cfg(
                tmp_path / "remote",
                "--train.steps=4",
                "--data.shards=s3://corpus/tiny",
                f"--data.cache_dir={tmp_path}/s3cache",
            )
        )
    finally:
        server.stop()
    assert [m["loss"] for m in remote] == [m["loss"] for m in local]
    assert list((tmp_path / "s3cache" / "remote").glob("*/train/index.json"))


def test_truncated_shard_stops_the_run_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    train(_cfg(tmp_path / "prep", "--train.steps=1"))
    src = next(CACHE.glob("prepared/*/manifest.json")).parent
    shards = tmp_path / "copy"
    shutil.copytree(src, shards, ignore=shutil.ignore_patterns("*.mds"))
    victim = sorted((shards / "train").glob("*.zstd"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    args = ["train", "configs/tiny.yaml", *FAST, f"--data.shards={shards}", f"--log.run_dir={tmp_path}/x"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "truncated" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bench_matrix_runs_each_configuration_in_its_own_process_and_prints_a_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tplus_dist.bench import main as bench

    args = ["--model", "tiny", "--provider", "torch-eager,nanogpt-eager,te-bf16", "--n-layers", "1",
            "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]  # fmt: skip
    assert bench(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = ["model", "provider", "tokens/s", "step", "s", "TFLOP/s", "MFU", "peak", "GB"]
    assert [line.split() for line in lines].count(header) == 1, out  # the table once (it was printed twice)
    table = lines[[line.split() for line in lines].index(header) :]
    assert "MFU against the bf16 dense peak" in table[-1]  # then where and how it was measured
    rows = {line.split()[1]: line for line in table[1:-1]}
    assert len(table[1:-1]) == len(rows) == 3 and all(out.count(line) == 1 for line in rows.values())
    assert set(rows) == {"torch-eager", "nanogpt-eager", "te-bf16"}
    assert float(rows["torch-eager"].split()[2].replace(",", "")) > 0  # measured tokens/s
    # on CPU the te row says why it is not measured (te_unavailable_reason: TE or CUDA missing), it does not fail
    assert "unavailable: " in rows["te-bf16"] and "failed:" not in rows["te-bf16"], rows["te-bf16"]
    assert any(word in rows["te-bf16"] for word in ("Transformer Engine", "CUDA")), rows["te-bf16"]
    with pytest.raises(ValueError, match="--provider te-fp9: not one of"):
        bench(["--model", "tiny", "--provider", "te-fp9"])
