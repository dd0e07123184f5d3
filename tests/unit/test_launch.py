"""`tplus launch`: the job's shape from SLURM's environment or options, the torchrun and deepspeed commands, and
a clear error before any rank starts for each bad input."""

from __future__ import annotations

import socket

import pytest

from tplus_dist.config import ConfigError
from tplus_dist.launch import LaunchError, build_command, expand_hostlist, job_shape, main
from tplus_dist.spawn import free_port

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[003-004],dgx-a7",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NODEID": "1",
    "SLURM_GPUS_ON_NODE": "8",
}


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[003-004,010],dgx-a7", ["gpu003", "gpu004", "gpu010", "dgx-a7"]),
        ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
        ("n[09-11]", ["n09", "n10", "n11"]),
    ],
)
def test_slurm_host_lists_expand_as_scontrol_show_hostnames(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_the_shape_comes_from_slurm():
    shape = job_shape(SLURM)
    assert shape.hosts == ["gpu003", "gpu004", "dgx-a7"]
    assert (shape.node_rank, shape.nproc_per_node, shape.world) == (1, 8, 24)
    assert shape.master_addr == "gpu003" and shape.master_port == 29500 + 4242 % 20000
    assert shape.source == "slurm"


def test_torchrun_rendezvous_and_deepspeed_hostfile_commands(tmp_path):
    shape = job_shape(SLURM)
    cmd = build_command("torchrun", shape, "cfg.yaml", ["--train.steps=5"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=3" in cmd and "--nproc-per-node=8" in cmd and "--rdzv-endpoint=gpu003:33742" in cmd
    assert "--rdzv-id=4242" in cmd and cmd[-4:] == ["-m", "tplus_dist.train", "cfg.yaml", "--train.steps=5"]
    ds = build_command("deepspeed", shape, "cfg.yaml", [], tmp_path / "hosts")
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"]  # the deepspeed CLI, by this interpreter
    assert "--no_ssh" in ds and "--node_rank=1" in ds and "--master_addr=gpu003" in ds
    assert ds[-3:] == ["--module", "tplus_dist.train", "cfg.yaml"]


def test_dry_run_prints_the_shape_the_hostfile_and_the_command(capsys, monkeypatch):
    env = {**SLURM, "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
           "SLURM_GPUS_ON_NODE": "2"}  # fmt: skip
    rc = main(["--launcher", "deepspeed", "--dry-run", "configs/tiny.yaml", "--parallel.zero_stage=1"], env)
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 node(s) x 2 = 2 ranks (slurm)" in out
    assert "localhost slots=2" in out and "--module tplus_dist.train configs/tiny.yaml --parallel.zero_stage=1" in out


@pytest.mark.parametrize(
    "argv, env, error, words",
    [
        (["--dry-run", "configs/nope.yaml"], {}, LaunchError, "the config file configs/nope.yaml does not exist"),
        (["--dry-run", "--train.steps=3", "configs/tiny.yaml"], {}, LaunchError, "the config file comes first"),
        (["--nproc-per-node", "3", "--dry-run", "configs/tiny.yaml", "--parallel.tensor_parallel=2"], {},
         ConfigError, "world size 3 is not divisible by tensor_parallel 2"),
        (["--nproc-per-node", "2", "--dry-run", "configs/tiny.yaml", "--train.device=cuda"], {}, LaunchError,
         "has 0 GPUs, but 2 processes per node"),
        (["--dry-run", "--master-addr", "no-such-host.invalid", "configs/tiny.yaml"], {}, LaunchError,
         "MASTER_ADDR 'no-such-host.invalid' does not resolve"),
        (["--dry-run", "configs/tiny.yaml"], {**SLURM, "SLURM_JOB_NUM_NODES": "2"}, LaunchError,
         "SLURM_JOB_NUM_NODES is 2 but SLURM_JOB_NODELIST names 3 hosts"),
        (["--nodes", "2", "--dry-run", "configs/tiny.yaml"], {}, LaunchError, "needs --master-addr"),
        (["--launcher", "mpirun", "--dry-run", "configs/tiny.yaml"], {}, LaunchError, "must be torchrun or deepspeed"),
    ],
)  # fmt: skip
def test_bad_input_is_named_before_any_rank_starts(argv, env, error, words):
    with pytest.raises(error) as info:
        main(argv, env)
    assert words in str(info.value), str(info.value)


def test_a_worker_node_that_cannot_reach_the_master_says_so():
    port = free_port()  # nothing listens there
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost,otherhost", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1"}  # fmt: skip
    argv = ["--nproc-per-node", "1", "--master-port", str(port), "--connect-timeout", "2", "configs/tiny.yaml"]
    with pytest.raises(LaunchError, match=f"cannot reach the master localhost:{port}"):
        main(argv, env)


def test_the_cli_reports_launch_errors_in_one_line(capsys):
    from tplus_dist.cli import main as cli

    assert cli(["launch", "--dry-run", "configs/nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tplus: launch error: the config file configs/nope.yaml does not exist on ")
    assert socket.gethostname() in err  # the node is named: configs differ between nodes only by mistake


@pytest.mark.parametrize(
    "option, value",
    [("--nproc-per-node", "0"), ("--nproc-per-node", "-2"), ("--nodes", "0"), ("--node-rank", "-1"),
     ("--master-port", "0"), ("--connect-timeout", "-5")],
)  # fmt: skip
def test_a_count_below_its_least_is_refused_not_silently_replaced(option: str, value: str, capsys):
    from tplus_dist.cli import main as cli

    # before: --nproc-per-node 0 ran one rank (0 fell through to the GPU count, then 1)
    assert cli(["launch", option, value, "--dry-run", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tplus: launch error: {option} must be at least ") and f"got {value}" in err
    assert err.count("\n") == 1


def test_a_config_path_that_is_a_directory_is_named_before_launch(tmp_path, capsys):
    from tplus_dist.cli import main as cli

    assert cli(["launch", "--dry-run", str(tmp_path)]) == 2
    assert f"the config file {tmp_path} is a directory, not a YAML file" in capsys.readouterr().err
