"""The shard loader: global order, rank partition, resume, prefetch, remote (S3 via moto), shm cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tplus_dist.data.loader import ShardBatches, open_split
from tplus_dist.data.order import BatchRamp
from tplus_dist.data.streaming_compat import import_streaming

SEQ = 8
N = 240


def write_split(out: Path, n: int = N, seq: int = SEQ) -> None:
    """Sample i holds [i, i+1, ..., i+seq] (mod 2^16): its content names it."""
    streaming = import_streaming()
    columns = {"tokens": "ndarray:uint16", "doc_starts": "ndarray:uint32"}
    with streaming.MDSWriter(out=str(out), columns=columns, compression="zstd", size_limit=400) as w:
        for i in range(n):
            w.write({"tokens": (np.arange(seq + 1) + i).astype(np.uint16), "doc_starts": np.zeros(1, np.uint32)})


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train")
    return root


def batches(
    root: Path | str,
    *,
    end: int = 8,
    start: int | None = None,
    inc: int = 0,
    ramp: int = 0,
    dp: int = 1,
    rank: int = 0,
    workers: int = 0,
    cache: Path | None = None,
) -> ShardBatches:
    ds = open_split(str(root), "train", cache or Path(str(root)) / "cache")
    return ShardBatches(
        ds,
        SEQ,
        2,
        BatchRamp(end, start, inc, ramp),
        seed=3,
        block_shards=2,
        dp_size=dp,
        dp_rank=rank,
        num_workers=workers,
    )


def consumed(loader: ShardBatches, steps: int) -> list[tuple[int, int]]:
    """(stream position, sample id from its content) for every sample of ``steps`` steps, this rank."""
    out = []
    for _ in range(steps):
        step = loader.next_step()
        for mb in step.micro_batches:
            assert (mb.targets[:, :-1] == mb.tokens[:, 1:]).all()
            out += list(zip(mb.positions.tolist(), mb.tokens[:, 0].tolist(), strict=True))
    return out


def test_shards_have_multiple_files(shards: Path) -> None:
    assert len(list((shards / "train").glob("shard.*.mds*"))) > 4


def test_order_is_the_same_under_batch_schedules_and_rank_counts(shards: Path) -> None:
    const = dict(consumed(batches(shards, end=8), 60))  # 480 samples: two epochs
    ramped = dict(consumed(batches(shards, end=8, start=2, inc=2, ramp=200 * SEQ), 100))
    two_ranks = {}
    for rank in range(2):
        two_ranks.update(consumed(batches(shards, end=8, dp=2, rank=rank), 60))
    common = set(const) & set(ramped)
    assert len(common) > 400
    assert all(const[p] == ramped[p] for p in common)
    assert two_ranks == const
    epoch = [const[p] for p in range(N)]
    assert sorted(epoch) == list(range(N)) and epoch != list(range(N))  # a shuffled full epoch


def test_ramp_steps_report_their_global_batch(shards: Path) -> None:
    loader = batches(shards, end=8, start=2, inc=2, ramp=30 * SEQ)
    sizes, firsts = [], []
    for _ in range(12):
        s = loader.next_step()
        sizes.append(s.global_batch)
        firsts.append(s.first_sample)
        assert s.last_sample == s.first_sample + s.global_batch - 1
        assert len(s.micro_batches) == s.global_batch // 2
    # 2 -> 8 in steps of 2 over 30 samples' tokens: +2 every 10 samples consumed
    assert sizes == [2, 2, 2, 2, 2, 4, 4, 4, 6, 6, 8, 8]
    assert firsts == list(np.cumsum([0, *sizes[:-1]]))


def test_resume_mid_epoch_continues_the_same_samples(shards: Path) -> None:
    full = consumed(batches(shards, end=8, start=2, inc=2, ramp=40 * SEQ), 30)
    first = batches(shards, end=8, start=2, inc=2, ramp=40 * SEQ)
    head = consumed(first, 13)
    state = first.state_dict()
    resumed = batches(shards, end=8, start=2, inc=2, ramp=40 * SEQ)
    resumed.load_state_dict(state)
    assert head + consumed(resumed, 17) == full


def test_resume_refuses_another_dataset(shards: Path, tmp_path: Path) -> None:
    write_split(tmp_path / "train", n=100)
    state = batches(shards).state_dict()
    with pytest.raises(ValueError, match="not the same data order"):
        batches(tmp_path).load_state_dict(state)


def test_prefetching_workers_give_the_same_batches(shards: Path) -> None:
    assert consumed(batches(shards, workers=2), 10) == consumed(batches(shards), 10)


def test_batch_not_divisible_by_ranks_is_refused(shards: Path) -> None:
    with pytest.raises(ValueError, match="multiple of micro_batch_size x data-parallel"):
        batches(shards, end=6, dp=2)


def test_s3_remote_reads_the_same_samples(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {
            "S3_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="corpus")
        for f in (shards / "train").iterdir():
            if f.is_file() and (f.name == "index.json" or f.name.endswith(".zstd")):
                s3.upload_file(str(f), "corpus", f"prep/train/{f.name}")
        remote = batches("s3://corpus/prep", cache=tmp_path / "cache")
        assert consumed(remote, 8) == consumed(batches(shards), 8)
    finally:
        server.stop()


def test_restart_after_kill_cleans_its_own_shared_memory(shards: Path, tmp_path: Path) -> None:
    """A killed job leaves streaming's shared memory naming its cache directory; the restart must not be
    blocked by it (and must not touch other jobs' segments)."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys, time
        from tplus_dist.data.streaming_compat import import_streaming
        streaming = import_streaming()
        ds = streaming.StreamingDataset(remote="{shards}/train", local="{cache}/train", shuffle=False, batch_size=1)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    # the whole process group, as a scheduler kills a job: Python's resource tracker too, which would otherwise
    # unlink the segments it saw created (and then there would be nothing stale to test)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    streaming = import_streaming()
    from tplus_dist.data.loader import clean_stale_shared_memory

    assert clean_stale_shared_memory() >= 1
    ds = streaming.StreamingDataset(remote=f"{shards}/train", local=str(cache / "train"), shuffle=False, batch_size=1)
    assert int(ds[0]["tokens"][0]) == 0


def _rank_positions(rank: int, world: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = batches(root, end=8, dp=world, rank=rank)
        got = consumed(loader, N // 8)  # one epoch
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_disjoint_samples_covering_the_epoch(shards: Path, tmp_path: Path) -> None:
    from tplus_dist.spawn import run_distributed

    run_distributed(_rank_positions, 2, str(shards), str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ids = [[s for _, s in p] for p in parts]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(N))
    assert dict(parts[0] + parts[1]) == dict(consumed(batches(shards, end=8), N // 8))


def _concurrent_job(
    rank: int, world: int, port: int, shards: str, cache: str, rounds: int, barrier: Any, report: str
) -> None:
    """One rank of one job (a forked process): each round, open the shards when every process of every job does, read a
    few samples while all of them hold their datasets, then let go."""
    import gc
    import traceback

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world)
        for r in range(rounds):
            barrier.wait(timeout=120)
            ds = open_split(shards, "train", cache)
            for i in (0, 7 * r + rank + 1, N - 1 - r):
                got = np.asarray(ds[i]["tokens"]).tolist()
                if got != [(i + k) % 65536 for k in range(SEQ + 1)]:
                    raise AssertionError(f"sample {i}: {got}")
            barrier.wait(timeout=120)
            del ds
            gc.collect()
    except BaseException:
        Path(report).write_text(traceback.format_exc())
        barrier.abort()
        raise


def test_jobs_starting_together_on_the_same_shards(tmp_path: Path) -> None:
    """Three jobs (one of two gloo ranks, two of one process) open the same shards at the same instant, three rounds,
    each reading while the others hold theirs: no registration error, the right samples, and the prepared folder
    is only read (shards are decompressed into the cache, never beside the source)."""
    import multiprocessing

    from tplus_dist.spawn import free_port

    src = tmp_path / "src"
    write_split(src / "train")
    before = sorted(p.name for p in (src / "train").iterdir())
    ctx = multiprocessing.get_context("fork")  # the children start with everything imported: seconds saved
    barrier = ctx.Barrier(4)
    jobs = [(0, 2), (1, 2), (0, 1), (0, 1)]  # (rank, world): the first two are one job
    ports = [free_port()] * 2 + [free_port(), free_port()]
    procs = [
        ctx.Process(
            target=_concurrent_job,
            args=(rank, world, port, str(src), str(tmp_path / "cache"), 3, barrier, str(tmp_path / f"err{i}")),
        )
        for i, ((rank, world), port) in enumerate(zip(jobs, ports, strict=True))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    errors = [(tmp_path / f"err{i}").read_text() for i in range(4) if (tmp_path / f"err{i}").exists()]
    errors.sort(key=lambda e: "BrokenBarrierError" in e)  # the cause first, the others' broken barriers after
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(p.name for p in (src / "train").iterdir()) == before
    assert not list((src / "train").glob("*.mds"))


def holding_pids(files: set[str]) -> set[int]:
    """Processes that have one of ``files`` open or mapped, from a plain scan of /proc (independent of tplus_dist)."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/maps") as f:
                mapped = {line.split()[-1] for line in f if "/dev/shm/" in line}
        except OSError:
            continue
        if files & (links | mapped):
            pids.add(int(pid))
    return pids


def test_a_live_jobs_segments_survive_another_jobs_start_and_a_killed_ones_go(shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys
        from tplus_dist.data.loader import open_split
        ds = open_split("{shards}", "train", "{cache}")
        print(ds._shm_prefix_int, flush=True)
        sys.stdin.readline()
        print(int(ds[5]["tokens"][0]), flush=True)
    """)

    def start() -> tuple[subprocess.Popen[str], int]:
        p = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        return p, p.pid

    (live, _), (killed, _) = start(), start()
    assert live.stdout is not None and killed.stdout is not None and live.stdin is not None
    live_prefix, killed_prefix = int(live.stdout.readline()), int(killed.stdout.readline())
    os.killpg(killed.pid, signal.SIGKILL)  # with its resource tracker, as a scheduler kills a job
    killed.wait()
    live_files = {str(p): p.stat().st_ino for p in Path("/dev/shm").glob(f"{live_prefix:06}_*")}
    killed_files = {str(p): p.stat().st_ino for p in Path("/dev/shm").glob(f"{killed_prefix:06}_*")}
    assert len(live_files) >= 6 and len(killed_files) >= 6
    # a process of another job on this machine may have attached to the dead job's segments (streaming without
    # tplus's registration can): then they are in use, and must stay
    foreign = holding_pids(set(killed_files))
    try:
        ds = open_split(str(shards), "train", cache)  # this job's start: cleanup and registration
        assert ds._shm_prefix_int != live_prefix
        # the live job's segments are the same files (not removed, not made anew); the killed job's are gone
        assert {p: os.stat(p).st_ino for p in live_files} == live_files
        # and choosing a prefix left no descriptor of ours on them (streaming's scan keeps one per segment it looks
        # at, which would make them look alive after their job dies)
        assert os.getpid() not in holding_pids(set(live_files))
        if not foreign:
            assert all(not os.path.exists(p) or os.stat(p).st_ino != ino for p, ino in killed_files.items())
        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "5"
        assert int(ds[5]["tokens"][0]) == 5
    finally:
        live.kill()
        live.wait()
