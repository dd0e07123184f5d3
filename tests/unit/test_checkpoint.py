"""Checkpoints in one process: a run stopped by SIGTERM and resumed equals the uninterrupted run bit for bit;
publishing is atomic (a failed save leaves the previous checkpoint latest and loadable); retention; bad
checkpoints are refused with a message naming what is wrong."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tplus_dist.checkpoint import CheckpointError
from tplus_dist.checkpoint.sharded import checkpoint_parameters
from tplus_dist.checkpoint.signals import StopRequest
from tplus_dist.config import ConfigError, load_config
from tplus_dist.train.hooks import Hook
from tplus_dist.train.metrics import read_metrics
from tplus_dist.train.run import build_trainer, train

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tplus-tests"
BASE = [
    "--model.seq_len=64",
    "--model.n_layers=2",
    "--train.steps=6",
    "--train.micro_batch_size=4",
    "--train.grad_accum=2",
    "--train.eval_interval=3",
    "--train.eval_samples=4",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--schedule.warmup_steps=2",
    "--model.resid_dropout=0.1",  # the RNG state must survive the restart too
    f"--data.cache_dir={CACHE}",
]
KEYS = ("loss", "grad_norm", "lr", "first_sample", "last_sample", "tokens")


class SignalAt(Hook):
    """Sends this process a real SIGTERM at the end of step ``step`` (as SLURM would, between steps)."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig = step, sig

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.sig)


def rows(history: list[dict[str, Any]]) -> list[list[Any]]:
    return [[m["step"], *(m[k] for k in KEYS), m.get("val_loss")] for m in history]


def interrupted(run_dir: Path, at: int, *extra: str, sig: int = signal.SIGTERM) -> list[dict[str, Any]]:
    cfg = load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", *extra])
    stop = StopRequest().install()
    try:
        trainer, _ = build_trainer(cfg, stop=stop)
        trainer.hooks.insert(0, SignalAt(at, sig))
        try:
            return trainer.fit()
        finally:
            trainer.close()  # the run directory's lock: another process resumes it next
    finally:
        stop.uninstall()


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return checkpoint_parameters(run_dir / "checkpoints" / latest)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[Any]]]:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    _, history = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}"]))
    return run_dir, rows(history)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_and_stops_and_the_resumed_run_is_the_same_run(tmp_path: Path, uninterrupted, sig: int):
    whole_dir, whole = uninterrupted
    run_dir = tmp_path / "run"
    first = interrupted(run_dir, 3, sig=sig)
    assert [m["step"] for m in first] == [1, 2, 3]  # stopped after the signal's step
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    _, rest = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}"]))  # resume: auto
    assert rows(first) + rows(rest) == whole  # bit for bit: losses, norms, lr, samples, validation
    got, want = final_model(run_dir), final_model(whole_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "run-1").exists()  # resumed in place


def test_resume_from_an_explicit_checkpoint_goes_to_a_new_run_directory(tmp_path: Path, uninterrupted):
    _, whole = uninterrupted
    run_dir = tmp_path / "run"
    interrupted(run_dir, 2, "--checkpoint.interval_steps=1")
    ckpt = run_dir / "checkpoints" / "step_00000002"
    resume = [*BASE, f"--log.run_dir={run_dir}", f"--checkpoint.resume={ckpt}"]
    _, rest = train(load_config("configs/tiny.yaml", resume))
    assert rows(rest) == whole[2:]
    assert (tmp_path / "run-1" / "checkpoints" / "step_00000006").is_dir()


def test_a_background_save_resumes_as_the_same_run_and_logs_the_stall(tmp_path: Path, uninterrupted, capsys):
    whole_dir, whole = uninterrupted
    run_dir = tmp_path / "run"
    flags = ["--checkpoint.background=true", "--checkpoint.interval_steps=2", "--checkpoint.keep_last=5"]
    _, history = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", *flags]))
    assert rows(history) == whole  # saving in the background changes nothing in the run
    out = capsys.readouterr().out
    assert "tplus: saved step 2 (interval, in the background)" in out and "the step loop waited" in out
    assert all("checkpoint_stall_s" in m for m in history if m["step"] in (2, 4))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004", "step_00000006"]
    resume = [*BASE, f"--log.run_dir={run_dir}", f"--checkpoint.resume={run_dir / 'checkpoints' / 'step_00000004'}"]
    _, rest = train(load_config("configs/tiny.yaml", resume))
    assert rows(rest) == whole[4:]  # a background checkpoint holds the state of its step, bit for bit
    got, want = final_model(tmp_path / "run-1"), final_model(whole_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_retention_keeps_the_last_k_and_every_mth(tmp_path: Path):
    run_dir = tmp_path / "run"
    extra = ["--checkpoint.interval_steps=1", "--checkpoint.keep_last=2", "--checkpoint.keep_every=2"]
    train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", *extra]))
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [".lock", "latest", "step_00000002", "step_00000004", "step_00000005", "step_00000006"]


def test_a_failed_save_leaves_the_previous_checkpoint_latest_and_loadable(tmp_path: Path, monkeypatch, uninterrupted):
    _, whole = uninterrupted
    run_dir = tmp_path / "run"
    interrupted(run_dir, 2)
    from tplus_dist.checkpoint import sharded

    def disk_full(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> int:
        path.write_bytes(b"\0" * 1000)  # part of the shard reached the disk, then the disk was full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded, "write_safetensors", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        interrupted(run_dir, 4)
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert [p.name for p in (run_dir / "checkpoints").glob(".partial-*")]  # the failed save's staging
    _, rest = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}"]))
    assert rows(rest) == whole[2:]  # resumed from step 2, the last complete checkpoint
    assert not list((run_dir / "checkpoints").glob(".partial-*"))  # cleaned at start


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncate", "truncated or replaced"),
        ("corrupt", "fails its checksum"),
        ("remove", "is missing"),
        ("manifest", "manifest.json is missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage: str, words: str):
    run_dir = tmp_path / "run"
    interrupted(run_dir, 2)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    target = ckpt / "state" / "rank00000.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    else:
        (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=words):
        train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", f"--checkpoint.resume={ckpt}"]))


def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(tmp_path: Path):
    run_dir = tmp_path / "run"
    interrupted(run_dir, 2)
    with pytest.raises(ConfigError) as info:
        train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", "--model.d_model=64"]))
    assert "model.d_model: checkpoint 128, config 64" in info.value.reason
    assert not (tmp_path / "run-1").exists()


KILL_DURING_SAVE = """
import os, signal, sys
from tplus_dist.checkpoint.manager import CheckpointManager
from tplus_dist.config import load_config
from tplus_dist.train.run import train

real_write = CheckpointManager._write

def write_then_die(self, job, tensors, own, rank):
    real_write(self, job, tensors, own, rank)
    if job.step == 4:  # the second save: its files are written, the manifest is not
        os.kill(os.getpid(), signal.SIGKILL)

CheckpointManager._write = write_then_die
train(load_config("configs/tiny.yaml", sys.argv[1:]))
"""


@pytest.mark.parametrize("background", [False, True])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_latest(tmp_path: Path, uninterrupted, background: bool):
    import subprocess
    import sys

    _, whole = uninterrupted
    run_dir = tmp_path / "run"
    args = [*BASE, f"--log.run_dir={run_dir}", "--checkpoint.interval_steps=2", f"--checkpoint.background={background}"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=root, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004").exists() and list(ckpts.glob(".partial-step_00000004-*"))
    _, rest = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}"]))
    assert rows(rest) == whole[2:]


# ------------------------------------------------------------------------------------------- verify-resume


VERIFY = [a for a in BASE if not a.startswith("--train.steps")]


def test_verify_resume_reports_a_matching_continuation(tmp_path: Path, capsys):
    from tplus_dist.cli import main

    rc = main(["verify-resume", "configs/tiny.yaml", *VERIFY, "--steps", "4", "--at", "2", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stopped after step 2 and resumed: the continuation matches bit for bit (4 steps" in out


def test_verify_resume_finds_where_a_broken_resume_first_differs(tmp_path: Path, monkeypatch, capsys):
    import tplus_dist.checkpoint.manager as manager
    from tplus_dist.cli import main

    monkeypatch.setattr(manager, "set_rng_state_plain", lambda state: None)  # a resume that forgets the RNG
    rc = main(["verify-resume", "configs/tiny.yaml", *VERIFY, "--steps", "4", "--at", "2", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "the continuation DIFFERS" in out and "first difference at step 3, loss:" in out  # dropout's masks


def test_verify_resume_on_another_layout_allows_fp32_rounding_and_no_more() -> None:
    """--resume-with compares within tolerances.Fp32Run's bounds (derived from rounding, not a fixed number): a
    difference of a few units in the last place passes, one a wrong gradient gives fails, and the parameters must be
    within both the rms and the per-element bound."""
    from tplus_dist.checkpoint.verify import Report, _same
    from tplus_dist.tolerances import Fp32Run, U

    run = Fp32Run(n_layers=4, width=512, tokens=(512,) * 4, lrs=(3e-3,) * 4)

    def bound(key: str, value: float) -> float:
        return run.grad_norm(1, value) if key == "grad_norm" else run.loss(1, value)

    assert _same(2.5, 2.5 * (1 + 8 * U), "loss", bound) and not _same(2.5, 2.5 + 1e-3, "loss", bound)
    assert _same(3.0, 3.0 * (1 + 8 * U), "grad_norm", bound) and not _same(3.0, 3.0 * 1.001, "grad_norm", bound)
    assert not _same(2.5, 2.5 * (1 + 8 * U), "loss")  # the same layout: bit for bit
    rms, largest = run.param_rms(), run.param_max()
    ok = Report(4, 2, 4, None, largest / 2, 10, "--parallel.tensor_parallel=1", 0.0, rms / 2, (rms, largest))
    assert ok.matches and "rms difference" in ok.text()
    assert not Report(4, 2, 4, None, largest / 2, 10, "x", 0.0, rms * 2, (rms, largest)).matches
    assert not Report(4, 2, 4, None, largest * 2, 10, "x", 0.0, rms / 2, (rms, largest)).matches
    assert not Report(4, 2, 4, None, 1e-9, 10, None, 0.0, 1e-9).matches  # same layout: exact


# ------------------------------------------------------------------------------------------------- export


def test_export_a_checkpoint_consolidated_and_as_hugging_face(tmp_path: Path):
    import json
    import stat

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tplus_dist import hf
    from tplus_dist.cli import main

    run_dir = tmp_path / "run"
    old_umask = os.umask(0o002)  # group-writable: every file the run and the exports write must follow it
    try:
        interrupted(run_dir, 2)
        ckpt = run_dir / "checkpoints" / "step_00000002"
        assert main(["export", str(ckpt), "--format", "consolidated", str(tmp_path / "flat")]) == 0
        assert main(["export", str(run_dir / "checkpoints"), "--format", "hf", str(tmp_path / "hf")]) == 0  # latest
    finally:
        os.umask(old_umask)
    files = [p for d in (run_dir / "checkpoints", tmp_path / "flat", tmp_path / "hf") for p in d.rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.is_file()}
    assert "hf/model.safetensors" in modes and "flat/model.safetensors" in modes
    assert modes == dict.fromkeys(modes, oct(0o664))
    flat = load_file(str(tmp_path / "flat" / "model.safetensors"))
    saved = checkpoint_parameters(ckpt)
    assert flat.keys() == saved.keys() and all(torch.equal(flat[k], saved[k]) for k in saved)
    cfg, model = hf.load(tmp_path / "hf")  # transformers' folder back into our decoder: the same weights
    v = cfg.vocab_size  # (the vocabulary's padding rows come back as zeros)
    assert all(torch.equal(p[:v], saved[n][:v]) for n, p in model.state_dict().items())
    # the run's byte-level tokenizer travels with it: EOS 256 in the config, the same ids from AutoTokenizer
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 256
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("héllo").input_ids == list("héllo".encode())


def test_export_cli_passes_the_tokenizer_option(monkeypatch):
    import tplus_dist.checkpoint.export as export
    from tplus_dist.cli import main

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(export, "export_checkpoint", lambda *a: calls.append(a))
    assert main(["export", "ck", "--format", "hf", "out", "--tokenizer", "bytes"]) == 0
    assert main(["export", "ck", "out2", "--tokenizer=data/tok.json", "--family=qwen2"]) == 0
    assert [c[2:] for c in calls] == [(Path("out"), None, "bytes"), (Path("out2"), "qwen2", "data/tok.json")]


def fake_run(tmp_path: Path, shards: Path | None, **tokenizer: Any) -> Any:
    """A run directory as training leaves it for export: RUN/checkpoints/step_N and RUN/data_manifest.json, the
    latter the manifest of ``shards`` (the prepared dataset the run read) or holding ``tokenizer`` alone."""
    import json

    from tplus_dist.checkpoint.store import Checkpoint
    from tplus_dist.data.prepare import read_manifest

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    record = read_manifest(shards) if shards is not None else {"tokenizer": tokenizer}
    (run / "data_manifest.json").write_text(json.dumps({"shards": str(shards), **record}))
    return Checkpoint(run / "checkpoints" / "step_00000002", {"step": 2})


def prepared(
    tmp_path: Path, name: str, tokenizer: str, text: str = "the quick brown fox jumps over the lazy dog"
) -> Path:
    from tplus_dist.data.prepare import prepare

    src = tmp_path / f"{name}.txt"
    src.write_text(f"{text}\n" * 200)
    prepare([str(src)], tokenizer, 16, tmp_path / name, progress=False)
    return tmp_path / name


def test_export_finds_a_trained_tokenizer_beside_the_runs_shards(tmp_path: Path):
    from tplus_dist.checkpoint.export import run_tokenizer
    from tplus_dist.data.tokenizers import HFTokenizer

    shards = prepared(tmp_path, "shards", "train:300")
    ckpt = fake_run(tmp_path, shards)
    cfg = load_config("configs/tiny.yaml", [f"--data.shards={shards}"])
    tok, source, warnings = run_tokenizer(cfg, None, ckpt)
    saved = HFTokenizer.from_file(shards / "tokenizer.json")  # what prepare trained and saved
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == saved.vocab_size > 257 and "shards" in source
    assert tok.encode("the quick fox") == saved.encode("the quick fox") != list(b"the quick fox")
    assert warnings == []
    cfg = load_config("configs/tiny.yaml", [f"--data.shards={tmp_path / 'gone'}", "--data.tokenizer=train:300"])
    tok, why, _ = run_tokenizer(cfg, None, ckpt)
    assert tok is None and "gone" in why


def test_export_writes_no_tokenizer_it_cannot_prove_is_the_runs(tmp_path: Path):
    """Remote shards, moved shards and shards re-prepared with another tokenizer: data.tokenizer (ignored by a run
    with data.shards) and whatever lies beside the shards now are not the run's tokenizer."""
    import shutil

    from tplus_dist.checkpoint.export import run_tokenizer
    from tplus_dist.data.tokenizers import ByteTokenizer

    shards = prepared(tmp_path, "shards", "train:300")
    ckpt = fake_run(tmp_path, shards)
    remote = load_config("configs/tiny.yaml", ["--data.shards=s3://bucket/shards"])  # data.tokenizer: bytes
    tok, why, _ = run_tokenizer(remote, None, ckpt)
    assert tok is None and "data_manifest.json" in why
    shutil.copyfile(shards / "tokenizer.json", tmp_path / "tokenizer.json")
    moved = load_config(
        "configs/tiny.yaml", [f"--data.shards={tmp_path / 'moved'}", f"--data.tokenizer={tmp_path / 'tokenizer.json'}"]
    )
    assert run_tokenizer(moved, None, ckpt)[0] is None
    # the same directory prepared again: a BPE of the same size trained on other text is another file
    shutil.rmtree(shards)
    prepared(tmp_path, "shards", "train:300", text="pack my box with five dozen liquor jugs")
    tok, why, _ = run_tokenizer(load_config("configs/tiny.yaml", [f"--data.shards={shards}"]), None, ckpt)
    assert tok is None and "sha256" in why
    shutil.rmtree(shards)
    prepared(tmp_path, "shards", "bytes")
    tok, why, _ = run_tokenizer(load_config("configs/tiny.yaml", [f"--data.shards={shards}"]), None, ckpt)
    assert tok is None and "its kind is bytes, the run's is hf" in why
    # no record at all (moved run directory, or a run from before data_manifest.json): nothing is provable
    (ckpt.path.parents[1] / "data_manifest.json").unlink()
    tok, why, _ = run_tokenizer(load_config("configs/tiny.yaml", [f"--data.shards={shards}"]), None, ckpt)
    assert tok is None and "data_manifest.json" in why
    # a run on remote byte-level shards records bytes, which needs no file
    bytes_run = fake_run(tmp_path / "b", None, kind="bytes", vocab_size=257, eos_id=256, file=None)
    tok, source, _ = run_tokenizer(remote, None, bytes_run)
    assert isinstance(tok, ByteTokenizer) and source == "bytes"


def test_an_explicit_tokenizer_that_contradicts_the_run_warns_naming_both(tmp_path: Path):
    import json

    from tplus_dist.checkpoint.export import run_tokenizer
    from tplus_dist.data.tokenizers import ByteTokenizer

    shards = prepared(tmp_path, "shards", "train:300")
    ckpt = fake_run(tmp_path, shards)
    cfg = load_config("configs/tiny.yaml", ["--data.shards=s3://bucket/shards"])
    tok, _, warnings = run_tokenizer(cfg, "bytes", ckpt)
    assert isinstance(tok, ByteTokenizer) and len(warnings) == 1
    vocab = json.loads((shards / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert "--tokenizer bytes (bytes, vocab 257)" in warnings[0] and f"(train:300: hf, vocab {vocab}," in warnings[0]
    other = prepared(tmp_path, "other", "train:300", text="pack my box with five dozen liquor jugs")
    _, _, warnings = run_tokenizer(cfg, str(other / "tokenizer.json"), ckpt)
    assert len(warnings) == 1 and "sha256" in warnings[0]
    assert run_tokenizer(cfg, str(shards), ckpt)[2] == []  # the run's own dataset directory
    assert run_tokenizer(cfg, str(shards / "tokenizer.json"), ckpt)[2] == []  # or its file


def test_a_bad_tokenizer_option_names_the_option_and_the_reason(tmp_path: Path):
    from tplus_dist.checkpoint.export import run_tokenizer

    cfg = load_config("configs/tiny.yaml", [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--tokenizer .*empty: a directory without a prepared dataset's manifest "):
        run_tokenizer(cfg, str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^--tokenizer .*bad\.json: .*bad\.json is not a tokenizer\.json"):
        run_tokenizer(cfg, str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"^--tokenizer .*missing\.json: .*does not exist"):
        run_tokenizer(cfg, str(tmp_path / "missing.json"))


def test_export_refuses_a_non_empty_output_and_a_damaged_checkpoint(tmp_path: Path, capsys, monkeypatch):
    import json

    from tplus_dist.cli import main

    run_dir = tmp_path / "run"
    interrupted(run_dir, 2)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), "--format", "consolidated", str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # a refused export creates nothing: every check runs before OUT is made
    (tmp_path / "empty").mkdir()
    big = prepared(tmp_path, "big", "train:300") / "tokenizer.json"  # more tokens than the tiny model's 257
    refusals = {
        "--tokenizer": ["--tokenizer", str(tmp_path / "empty")],
        "gpt2 (GPT2LMHeadModel) cannot represent": ["--family", "gpt2"],
        "more than the model's vocab_size (257)": ["--tokenizer", str(big)],
    }
    for words, args in refusals.items():
        assert main(["export", str(ckpt), "--format", "hf", str(tmp_path / "refused"), *args]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
    # a run whose record names a tokenizer that is not here: the model alone and one warning line saying why
    record = json.loads((run_dir / "data_manifest.json").read_text())
    record["tokenizer"] = {"kind": "hf", "spec": "tok.json", "vocab_size": 257, "eos_id": 0, "sha256": "ab" * 32}
    (run_dir / "data_manifest.json").write_text(json.dumps(record))
    assert main(["export", str(ckpt), "--format", "hf", str(tmp_path / "alone")]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warned) == 1 and "data_manifest.json" in warned[0] and "pass --tokenizer" in warned[0]
    assert not (tmp_path / "alone" / "tokenizer.json").exists() and (tmp_path / "alone" / "config.json").exists()
    # a failure after the files are written (the logit check) leaves no half export behind, under any name
    import tplus_dist.hf.convert as convert

    def disagree(*_args: object) -> None:
        raise convert.HFExportError("logits disagree (forced by the test)")

    monkeypatch.setattr(convert, "_verify", disagree)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(ckpt), "--format", "hf", str(tmp_path / "half")]) != 0
    assert "logits disagree" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.undo()
    (ckpt / "state" / "rank00000.safetensors").write_bytes(b"garbage")
    assert main(["export", str(ckpt), "--format", "consolidated", str(tmp_path / "new")]) == 2
    assert "rank00000.safetensors is 7 bytes, the manifest says" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_the_resume_flag_is_the_checkpoint_resume_field():
    from tplus_dist.cli import _resume_flag

    assert _resume_flag(["c.yaml", "--resume", "runs/x"]) == ["c.yaml", "--checkpoint.resume=runs/x"]
    assert _resume_flag(["--resume=p", "c.yaml"]) == ["--checkpoint.resume=p", "c.yaml"]
    with pytest.raises(ConfigError):
        _resume_flag(["c.yaml", "--resume"])


class ForwardCount(torch.nn.Module):
    """A module with state outside its parameters, kept through torch's extra-state API as Transformer Engine keeps
    its FP8 scaling state (amax history and scales, updated at every forward): here, the number of forwards of the
    block it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.count])

    def set_extra_state(self, state: Any) -> None:
        self.count = int(state[0])


def test_modules_extra_state_resumes_with_the_run(tmp_path: Path, monkeypatch):
    """The FP8 scaling state path (checkpoint/extra_state.py) through a real save and resume: a module's extra state
    after the interrupted-and-resumed run equals the uninterrupted run's. Without it the resumed count would restart
    from 0 (a resumed FP8 delayed-scaling run would restart its amax history)."""
    import tplus_dist.train.run as run_module

    counters: list[ForwardCount] = []
    build = run_module.build_decoder

    def with_counter(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build(*args, **kwargs)
        counter = ForwardCount()
        model.layers["0"].forward_count = counter  # a submodule of block 0: named layers.0.forward_count
        model.layers["0"].register_forward_pre_hook(lambda *_: setattr(counter, "count", counter.count + 1))
        counters.append(counter)
        return model

    monkeypatch.setattr(run_module, "build_decoder", with_counter)
    train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={tmp_path / 'whole'}"]))
    whole = counters[-1].count
    assert whole >= 6 * 2  # 6 steps of 2 micro-batches, and the evaluations
    interrupted(tmp_path / "run", 3)
    assert 0 < counters[-1].count < whole
    train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={tmp_path / 'run'}"]))
    assert counters[-1].count == whole
