"""A run never loses or corrupts work (issue 14, the run and its checkpoints): a kill at any point of a save
leaves a run that resumes as the uninterrupted one; a stale `latest` is repaired; Ctrl-C saves and stops; a stopped
run says so and exits 75; unwritable paths, refused resumes, a second job on a running run and a checkpoint
directory shared by two runs are stopped before anything is created.

Every expected value comes from outside the code under test: the uninterrupted run's losses and parameters, where a
kill at a given point must leave the directory (known from the point), exit codes documented in the README, the
files on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_checkpoint import BASE, final_model, rows
from tplus_dist.checkpoint.store import (
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    find_checkpoint,
    publish,
    read_manifest,
    step_name,
)
from tplus_dist.cli import main
from tplus_dist.config import load_config
from tplus_dist.train.metrics import read_metrics
from tplus_dist.train.run import train

ROOT = Path(__file__).resolve().parents[2]
SAVE_EVERY_2 = ["--checkpoint.interval_steps=2", "--checkpoint.keep_last=5"]


def tplus_train(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.Popen[str]:
    """`tplus train` on BASE in a child process (TPLUS_FAULT set to ``fault``)."""
    env = {k: v for k, v in os.environ.items() if k != "TPLUS_FAULT"}
    env.update(OMP_NUM_THREADS="1", TPLUS_NUM_THREADS="1", **({"TPLUS_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "tplus_dist", "train", "configs/tiny.yaml", *BASE, f"--log.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def resume(run_dir: Path, *extra: str) -> list[dict[str, Any]]:
    _, history = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}", *SAVE_EVERY_2, *extra]))
    return history


# A kill -9 at each point of the save of step 4 (step 2's save completed before it). Until the rename, step 4 is
# not a checkpoint and the run resumes from step 2; after it, step 4 is complete and must win, whatever `latest`
# says. (point, the step the restart resumes from)
KILL_POINTS = [
    ("save.before_files", 2),
    ("save.mid_file", 2),
    ("save.after_state", 2),
    ("save.after_manifest", 2),
    ("save.after_rename", 4),
    ("save.after_latest", 4),
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[Any]]]:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    _, history = train(load_config("configs/tiny.yaml", [*BASE, f"--log.run_dir={run_dir}"]))
    return run_dir, rows(history)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """One run per kill point, each killed by SIGKILL in the middle of saving step 4 (started together)."""
    base = tmp_path_factory.mktemp("killed")
    procs = {p: tplus_train(base / p, *SAVE_EVERY_2, fault=f"{p}:kill:step=4") for p, _ in KILL_POINTS}
    out = {}
    for point, proc in procs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, text[-3000:]
        assert f"injected fault: kill at {point}" in text
        out[point] = (base / point, text)
    shutil.copytree(base / "save.after_latest", base / "pristine")  # as the kill left it, for another test
    out["pristine"] = (base / "pristine", "")
    return out


@pytest.mark.parametrize(("point", "resumed_from"), KILL_POINTS)
def test_a_kill_at_any_point_of_a_save_resumes_as_the_uninterrupted_run(
    killed, uninterrupted, point: str, resumed_from: int, capsys
) -> None:
    whole_dir, whole = uninterrupted
    run_dir, _ = killed[point]
    rest = resume(run_dir)
    assert rows(rest) == whole[resumed_from:]  # bit for bit from the expected checkpoint on
    got, want = final_model(run_dir), final_model(whole_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == step_name(6)
    assert not list(ckpts.glob(".partial-*"))  # an interrupted save's staging is removed at the next start
    # every step's metrics row exactly once, and the same numbers (the row of step 4 was written before its save)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [[m["loss"], m["grad_norm"]] for m in read_metrics(run_dir)] == [[r[1], r[2]] for r in whole]
    out = capsys.readouterr().out
    if point == "save.after_rename":  # `latest` still named step 2: repaired, with one line saying so
        assert f"latest named {step_name(2)}; {step_name(4)} is the newest complete checkpoint" in out


def test_a_damaged_newest_checkpoint_is_skipped_named_and_kept_aside(
    killed, uninterrupted, tmp_path: Path, capsys
) -> None:
    whole_dir, whole = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(killed["pristine"][0], run_dir)  # killed after step 4's checkpoint was published
    state = run_dir / "checkpoints" / step_name(4) / "state" / "rank00000.safetensors"
    data = bytearray(state.read_bytes())
    data[-7] ^= 0xFF  # one flipped bit, same size
    state.write_bytes(bytes(data))
    rest = resume(run_dir)
    out = capsys.readouterr().out
    assert f"not resuming from {run_dir / 'checkpoints' / step_name(4)}" in out and "fails its checksum" in out
    assert rows(rest) == whole[2:]  # from step 2, the newest that verifies
    aside = list((run_dir / "checkpoints").glob(f".damaged-{step_name(4)}-*"))
    assert len(aside) == 1 and (aside[0] / "state" / "rank00000.safetensors").read_bytes() == bytes(data)
    assert f"{step_name(4)} already existed but" in out and "moved it to" in out
    got, want = final_model(run_dir), final_model(whole_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_full_disk_while_latest_is_rewritten_leaves_a_run_that_continues(
    uninterrupted, tmp_path: Path, monkeypatch, capsys
) -> None:
    whole_dir, whole = uninterrupted
    from tplus_dist.checkpoint import store

    real = store.write_atomic

    def full_disk_at_step_4(path: Path, text: str) -> None:
        if path.name == "latest" and text.strip() == step_name(4):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(store, "write_atomic", full_disk_at_step_4)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="No space left on device"):
        resume(run_dir)
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_name(2)  # step 4 complete beside it
    rest = resume(run_dir)
    assert rows(rest) == whole[4:]
    assert f"latest named {step_name(2)}; {step_name(4)} is the newest complete checkpoint" in capsys.readouterr().out
    got, want = final_model(run_dir), final_model(whole_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _fake_checkpoint(root: Path, step: int, payload: bytes) -> Path:
    """A published checkpoint made by hand: one file and a manifest with its size and xxh3-128."""
    import xxhash

    d = root / step_name(step)
    (d / "state").mkdir(parents=True)
    (d / "state" / "f").write_bytes(payload)
    files = {"state/f": {"bytes": len(payload), "xxh3_128": xxhash.xxh3_128(payload).hexdigest()}}
    (d / "manifest.json").write_text(json.dumps({"format": 2, "step": step, "files": files}))
    return d


def _staging(root: Path, step: int, payload: bytes) -> tuple[Path, dict[str, Any]]:
    import xxhash

    d = root / f".partial-{step_name(step)}-abc"
    (d / "state").mkdir(parents=True)
    (d / "state" / "f").write_bytes(payload)
    files = {"state/f": {"bytes": len(payload), "xxh3_128": xxhash.xxh3_128(payload).hexdigest()}}
    return d, {"format": 2, "step": step, "files": files}


def test_publishing_a_step_that_exists_keeps_a_verified_one_and_moves_a_damaged_one_aside(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _fake_checkpoint(root, 2, b"two")
    existing = _fake_checkpoint(root, 4, b"four, saved before a kill")
    (root / "latest").write_text(step_name(2) + "\n")  # the kill came before latest was updated
    staging, manifest = _staging(root, 4, b"four, saved again")
    final, note = publish(staging, manifest)
    assert final == existing and (existing / "state" / "f").read_bytes() == b"four, saved before a kill"
    assert not staging.exists() and (root / "latest").read_text().strip() == step_name(4)
    assert note is not None and "already existed and verifies" in note
    # a damaged existing one (a file truncated): moved aside, never deleted, and this save published
    (existing / "state" / "f").write_bytes(b"four")
    staging, manifest = _staging(root, 4, b"four, saved again")
    final, note = publish(staging, manifest)
    assert (final / "state" / "f").read_bytes() == b"four, saved again"
    aside = list(root.glob(f".damaged-{step_name(4)}-*"))
    assert len(aside) == 1 and (aside[0] / "state" / "f").read_bytes() == b"four"
    assert note is not None and "moved it to" in note
    # another run's checkpoint of the same step (a shared checkpoint directory): never taken, never moved
    theirs = json.loads((final / "manifest.json").read_text())
    (final / "manifest.json").write_text(json.dumps({**theirs, "run": {"id": "theirs", "dir": "/runs/a"}}))
    staging, manifest = _staging(root, 4, b"four, mine")
    with pytest.raises(CheckpointError, match="belongs to another run"):
        publish(staging, {**manifest, "run": {"id": "mine", "dir": "/runs/b"}})
    assert (final / "state" / "f").read_bytes() == b"four, saved again"
    # what is a checkpoint: a published directory with a readable manifest, newest first; latest is not needed
    (root / "latest").unlink()
    (root / step_name(6)).mkdir()  # no manifest: a save that never finished
    assert [c.path.name for c in complete_checkpoints(root)] == [step_name(4), step_name(2)]
    assert find_checkpoint(root).path.name == step_name(4)
    assert Checkpoint(final, read_manifest(final)).step == 4


# ------------------------------------------------------------------------------------ signals and exit codes


def test_ctrl_c_saves_and_stops_like_sigterm_and_a_second_stops_at_once(tmp_path: Path, monkeypatch, capfd) -> None:
    args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("TPLUS_FAULT", "data:sigint:step=3")  # Ctrl-C while step 3 runs
    assert main(args) == 75  # stopped with a checkpoint: "resume me"
    captured = capfd.readouterr()
    assert "interrupted: saving a checkpoint at the end of this step" in captured.err
    assert f"stopped at step 3 of 6 on SIGINT, with its checkpoint {tmp_path / 'run' / 'checkpoints'}" in captured.out
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == step_name(3)
    # a second Ctrl-C in the same step: stop at once (130), nothing saved for that step, no traceback
    monkeypatch.setenv("TPLUS_FAULT", "data:sigint:step=5,forward:sigint:step=5")
    assert main(args) == 130
    captured = capfd.readouterr()
    assert "interrupted: stopped at once, without saving" in captured.err and "Traceback" not in captured.err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == step_name(3)
    # the same command resumes and finishes: exit 0
    monkeypatch.delenv("TPLUS_FAULT")
    assert main(args) == 0
    assert "finished: 3 steps, step 6 of 6" in capfd.readouterr().out


def test_a_sigterm_stop_exits_75_and_says_where_it_stopped(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TPLUS_FAULT", "data:sigterm:step=2")
    assert main(["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'run'}"]) == 75
    out = capsys.readouterr().out
    assert "stopped at step 2 of 6 on SIGTERM" in out and "run the same command to resume" in out
    assert "done" not in out and "finished" not in out


def test_the_same_command_continues_its_run_after_a_crash_before_any_checkpoint(
    uninterrupted, tmp_path: Path, monkeypatch, capsys
) -> None:
    _, whole = uninterrupted
    args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("TPLUS_FAULT", "data:raise:step=3")  # dies in step 3: no checkpoint yet
    assert main(args) == 1
    monkeypatch.setenv("TPLUS_FAULT", "data:sigterm:step=4")  # the same command: the same directory, from step 0
    assert main(args) == 75
    monkeypatch.delenv("TPLUS_FAULT")
    assert main(args) == 0  # and again: resumed from its step 4, in the same directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # never run-1, run-2
    assert [[m["loss"], m["grad_norm"]] for m in read_metrics(tmp_path / "run")] == [[r[1], r[2]] for r in whole]
    assert "resumed from" in capsys.readouterr().out


def test_a_run_started_from_resume_path_continues_from_its_own_checkpoints(
    uninterrupted, tmp_path: Path, monkeypatch, capsys
) -> None:
    _, whole = uninterrupted
    monkeypatch.setenv("TPLUS_FAULT", "data:sigterm:step=2")
    assert main(["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'src'}"]) == 75
    args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'run'}"]
    args.append(f"--resume={tmp_path / 'src' / 'checkpoints' / step_name(2)}")
    monkeypatch.setenv("TPLUS_FAULT", "data:sigterm:step=4")
    assert main(args) == 75  # steps 3 and 4 from src's step 2, then stopped
    monkeypatch.delenv("TPLUS_FAULT")
    capsys.readouterr()
    assert main(args) == 0  # the same command (a requeue): from its own step 4, not from src's step 2 again
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} already continues" in out and f"resumed from {tmp_path / 'run'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "src"]
    assert [[m["loss"], m["grad_norm"]] for m in read_metrics(tmp_path / "run")] == [[r[1], r[2]] for r in whole[2:]]


# ------------------------------------------------------------------------ checks before anything is created


@pytest.fixture
def read_only(tmp_path: Path):
    """A read-only filesystem (tmpfs mounted ro: as root, permission bits alone stop nothing)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_unwritable_run_or_checkpoint_directories_stop_before_any_work(tmp_path: Path, read_only: Path, capsys):
    args = ["train", "configs/tiny.yaml", *BASE]
    assert main([*args, f"--log.run_dir={read_only / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"log.run_dir: {read_only / 'run'} cannot be written (it would be created in {read_only})" in err
    assert "Read-only file system" in err
    run_dir = tmp_path / "run"
    assert main([*args, f"--log.run_dir={run_dir}", f"--checkpoint.dir={read_only / 'ckpts'}"]) == 2
    assert f"checkpoint.dir: {read_only / 'ckpts'} cannot be written" in capsys.readouterr().err
    assert main([*args, f"--log.run_dir={run_dir}", f"--data.cache_dir={read_only / 'cache'}"]) == 2
    assert f"data.cache_dir: {read_only / 'cache'} cannot be written" in capsys.readouterr().err
    assert not run_dir.exists()  # nothing was created, and no step ran


def test_a_refused_resume_creates_no_run_directory(tmp_path: Path, capsys) -> None:
    first = tmp_path / "first"
    train(
        load_config(
            "configs/tiny.yaml", [*BASE, "--train.steps=2", "--schedule.warmup_steps=1", f"--log.run_dir={first}"]
        )
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    for other in (["--model.n_layers=3"], ["--optim.name=adafactor"]):
        args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={first}", f"--resume={first / 'checkpoints'}"]
        assert main([*args, *other]) == 2
        err = capsys.readouterr().err
        assert ("model.n_layers: checkpoint 2, config 3" in err) or ("optim.name" in err and "adamw" in err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no first-1
    assert main(["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={first}", "--model.n_layers=3"]) == 2
    assert "model.n_layers: checkpoint 2, config 3" in capsys.readouterr().err  # auto resume: refused the same way
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # a damaged checkpoint named with --resume: refused before the new run's directory exists
    damaged = tmp_path / "first" / "checkpoints" / step_name(2) / "state" / "rank00000.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x10
    damaged.write_bytes(bytes(data))
    args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={tmp_path / 'second'}"]
    assert main([*args, f"--resume={damaged.parents[2]}"]) == 2
    assert f"{damaged} fails its checksum" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------------------ two jobs at once


def test_a_second_job_on_a_running_run_stops_at_once_naming_the_holder(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    first = tplus_train(run_dir, *SAVE_EVERY_2, fault="data:hang:step=3")  # saved step 2, then stuck in step 3
    try:
        deadline = time.monotonic() + 120
        metrics_file = run_dir / "metrics.jsonl"

        def saved_and_logged() -> bool:  # the save's own metrics line follows `latest`: wait for both
            return (run_dir / "checkpoints" / "latest").is_file() and "checkpoint_s" in metrics_file.read_text()

        while not saved_and_logged():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.2)
        metrics = metrics_file.read_text()
        args = ["train", "configs/tiny.yaml", *BASE, f"--log.run_dir={run_dir}", *SAVE_EVERY_2]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is in use by another job (pid {first.pid} on" in err
        assert (run_dir / "metrics.jsonl").read_text() == metrics  # the first job's files are untouched
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [".lock", "latest", step_name(2)]
    finally:
        first.kill()
        first.communicate()
    # kill -9 leaves no stale lock: the same command now resumes the run from step 2 and finishes
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().out and (run_dir / "checkpoints" / step_name(6)).is_dir()


def test_two_starts_of_one_run_at_once_let_one_run_and_stop_the_other(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # started together; a stays alive (stuck in step 3) so that whoever loses the lock meets a live holder
    a = tplus_train(run_dir, fault="data:hang:step=3")
    b = tplus_train(run_dir)
    try:
        out_b, _ = b.communicate(timeout=300)
        if b.returncode == 2:  # a took the run first
            assert f"{run_dir} is in use by another job (pid {a.pid} on" in out_b, out_b[-3000:]
            loser_out = out_b
        else:  # b took it first and finished; a stopped at once
            assert b.returncode == 0, out_b[-3000:]
            out_a, _ = a.communicate(timeout=120)
            assert a.returncode == 2 and f"is in use by another job (pid {b.pid} on" in out_a, out_a[-3000:]
            loser_out = out_a
        assert "parameters on" not in loser_out  # the loser trained nothing
        rows_ = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows_ if "loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # one job's rows, each once
        assert not (tmp_path / "run-1").exists()
    finally:
        a.kill()
        a.communicate()


def test_a_checkpoint_directory_another_job_is_using_is_refused_before_its_first_save(tmp_path: Path, capsys) -> None:
    shared = tmp_path / "shared-ckpts"
    first = tplus_train(tmp_path / "a", f"--checkpoint.dir={shared}", fault="data:hang:step=1")  # no save yet
    try:
        deadline = time.monotonic() + 120
        while not (shared / ".lock").exists():  # a locks the directory when it starts
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        args = ["train", "configs/tiny.yaml", *BASE, f"--checkpoint.dir={shared}", f"--log.run_dir={tmp_path / 'b'}"]
        assert main(args) == 2
        assert f"{shared} is in use by another job (pid {first.pid} on" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
    finally:
        first.kill()
        first.communicate()


def test_a_checkpoint_directory_of_another_run_is_refused_and_its_checkpoint_resumes_only_by_name(
    tmp_path: Path, capsys
) -> None:
    shared = tmp_path / "shared-ckpts"
    a = [
        "train",
        "configs/tiny.yaml",
        *BASE,
        "--train.steps=2",
        "--schedule.warmup_steps=1",
        f"--checkpoint.dir={shared}",
    ]
    assert main([*a, f"--log.run_dir={tmp_path / 'a'}"]) == 0
    assert (
        json.loads((tmp_path / "a" / "run.json").read_text())["id"] == read_manifest(shared / step_name(2))["run"]["id"]
    )
    assert main([*a, f"--log.run_dir={tmp_path / 'b'}", "--train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.dir: {shared} holds checkpoints of another run ({tmp_path / 'a'}" in err
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in shared.iterdir()) == [".lock", "latest", step_name(2)]
    # named explicitly, into a run with its own checkpoint directory: resumed
    b = ["train", "configs/tiny.yaml", *BASE, "--train.steps=4", f"--log.run_dir={tmp_path / 'b'}"]
    assert main([*b, f"--resume={shared / step_name(2)}"]) == 0
    assert (tmp_path / "b" / "checkpoints" / step_name(4)).is_dir()
    # and run a continues its own
    assert main([*a, f"--log.run_dir={tmp_path / 'a'}", "--train.steps=3"]) == 0
    assert "resumed from" in capsys.readouterr().out and (shared / step_name(3)).is_dir()
