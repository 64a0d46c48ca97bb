"""Distributed training decides together: a NaN on one rank makes every rank skip the same step, and a
failure on one rank stops every rank with its message, instead of leaving the others in a collective.

The two-process tests start two real gloo processes on the CPU (the environment torchrun would set)
running a Trainer subclass that injects the fault; each process's output is read separately.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beseg.engine import trainer as trainer_mod
from beseg.engine.config import load_config
from beseg.engine.distributed import DistInfo, init_distributed
from beseg.engine.rundir import read_metrics
from beseg.engine.trainer import Trainer, TrainingError
from beseg.errors import ConfigError
from conftest import tiny_train_config

# A child process of a 2-rank run. argv: mode, config, data, run folder, result folder.
CHILD = r"""
import json, os, sys
import torch
from beseg.engine.checkpoint import CheckpointError
from beseg.engine.config import load_config
from beseg.engine.trainer import Trainer
from beseg.errors import BesegError

mode, cfg, data, run, out = sys.argv[1:]
rank = int(os.environ["RANK"])

class NaNOnRank1AtStep2(Trainer):
    skipped_at: list = []
    def compute_loss(self, logits, label):
        loss = super().compute_loss(logits, label)
        return loss * float("nan") if self.dist.rank == 1 and self.global_step == 1 else loss
    def on_nonfinite(self, what, rank):
        decision = super().on_nonfinite(what, rank)
        if decision == "skip":
            self.skipped_at.append(self.global_step + 1)
        return decision

class DiskFullOnRank0(Trainer):
    def save_checkpoint(self, best, last):
        raise CheckpointError(f"could not write checkpoint {self.run_dir.last}: No space left on device; "
                              "the previous file is intact.")

trainer = {"nan": NaNOnRank1AtStep2, "diskfull": DiskFullOnRank0}[mode](load_config(cfg)[0], data, run, progress=False)
try:
    trainer.run()
except BesegError as err:  # what the CLI does: one line, exit 1
    print(f"beseg train: error: {err}", file=sys.stderr)
    sys.exit(1)
model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
torch.save(model.state_dict(), f"{out}/weights{rank}.pt")
with open(f"{out}/skipped{rank}.json", "w") as f:
    json.dump(trainer.skipped_at, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(mode: str, cfg: Path, data: Path, run: Path, out: Path, timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Start ranks 0 and 1 of a gloo run and wait for both; fails the test if either hangs."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, mode, str(cfg), str(data), str(run), str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a rank was still running after {timeout} s: the ranks did not stop together")
    return done


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "beseg-cache"))


@pytest.mark.slow
def test_a_nan_on_one_rank_makes_every_rank_skip_the_same_step(tiny_phantom, tmp_path):
    cfg = tiny_train_config(tmp_path, train={"epochs": 1, "steps_per_epoch": 3, "device": "cpu", "on_nonfinite": "skip"})
    run, out = tmp_path / "run", tmp_path / "out"
    ranks = run_two_ranks("nan", cfg, tiny_phantom, run, out)
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 0, f"rank {rank}: {proc.stderr[-3000:]}"
    # both skipped step 2 (only rank 1 saw the NaN), and both hold the same weights afterwards
    assert [json.loads((out / f"skipped{r}.json").read_text()) for r in (0, 1)] == [[2], [2]]
    w0, w1 = (torch.load(out / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in w0.items():
        torch.testing.assert_close(w1[key], value, rtol=0, atol=0, msg=f"ranks differ at {key}")
    assert [r["skipped_steps"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1]


@pytest.mark.slow
def test_an_exception_on_rank_0_stops_both_ranks_with_its_message(tiny_phantom, tmp_path):
    cfg = tiny_train_config(tmp_path, train={"epochs": 2, "steps_per_epoch": 1, "device": "cpu",
                                             "dist_timeout_s": 600.0})  # the backstop must not be what ends it
    run = tmp_path / "run"
    ranks = run_two_ranks("diskfull", cfg, tiny_phantom, run, tmp_path / "out")
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 1, f"rank {rank}: {proc.stderr[-3000:]}"
        lines = [line for line in proc.stderr.splitlines() if line.startswith("beseg train: error:")]
        assert len(lines) == 1, proc.stderr[-3000:]
        assert ("training stopped on all 2 processes: rank 0 failed while writing the logs and checkpoints: "
                f"could not write checkpoint {run / 'checkpoints' / 'last.pt'}: No space left on device") in lines[0]
        assert "Traceback" not in proc.stderr
    assert not (run / ".claim").exists()


# ---------------------------------------------------------------------------------------------
# the decision logic and the device choice, in one process


def _as_rank(trainer: Trainer, rank: int, monkeypatch, failures: dict[int, str], losses=None) -> None:
    """Make ``trainer`` rank ``rank`` of 2 whose collectives report ``failures`` (rank -> error text)."""
    trainer.dist = DistInfo(rank, 2, rank, torch.device("cpu"))

    def rows(info, row):
        table = torch.zeros(2, len(row), dtype=torch.float64)
        for r in (0, 1):
            table[r, 0] = float(r in failures)
            if len(row) > 1:
                table[r, 1] = (losses or [0.5, 0.5])[r]
        return table

    monkeypatch.setattr(trainer_mod, "gather_rows", rows)
    monkeypatch.setattr(trainer_mod, "gather_texts", lambda info, text: [failures.get(r) for r in (0, 1)])


@pytest.fixture
def trainer(tiny_phantom, tmp_path) -> Trainer:
    return Trainer(load_config(tiny_train_config(tmp_path))[0], tiny_phantom, tmp_path / "run")


def test_a_healthy_rank_stops_when_another_rank_failed(trainer, monkeypatch):
    _as_rank(trainer, 0, monkeypatch, {1: "RuntimeError: CUDA out of memory"})
    with pytest.raises(TrainingError, match="training stopped on all 2 processes: rank 1 failed while validating: "
                                            "RuntimeError: CUDA out of memory"):
        with trainer.all_ranks("validating"):
            pass  # this rank is fine


def test_the_failing_rank_raises_the_same_message_chained_to_its_error(trainer, monkeypatch):
    _as_rank(trainer, 1, monkeypatch, {1: "RuntimeError: CUDA out of memory"})
    with pytest.raises(TrainingError, match="rank 1 failed while validating") as info:
        with trainer.all_ranks("validating"):
            raise RuntimeError("CUDA out of memory")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_one_process_sees_its_own_exception_unchanged(trainer):
    with pytest.raises(KeyError, match="x"):
        with trainer.all_ranks("anything"):
            raise KeyError("x")


def test_rank_0_learns_of_a_nonfinite_loss_on_rank_1_and_names_it(trainer, monkeypatch):
    _as_rank(trainer, 0, monkeypatch, {}, losses=[0.5, float("nan")])
    values = trainer._share_losses(0.5, None)
    assert values[0] == 0.5 and math.isnan(values[1])
    trainer.config.train.on_nonfinite = "stop"
    with pytest.raises(TrainingError, match="non-finite loss nan on rank 1 at epoch 1, step 1"):
        trainer._act_on_nonfinite("loss nan", 1)


def test_cuda_requested_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device='cuda' but CUDA is not available on this machine"):
        init_distributed("cuda")
    assert init_distributed("auto").device == torch.device("cpu")


@pytest.mark.parametrize("device,env,match", [
    ("cuda", {"LOCAL_RANK": "3"}, "LOCAL_RANK=3 but this machine has only 2 CUDA device"),
    ("cuda:5", {}, "train.device='cuda:5' but this machine has 2 CUDA device"),
    ("cuda:1", {"WORLD_SIZE": "4"}, "names one GPU, but 4 processes were started"),
])
def test_gpu_choices_that_cannot_work_are_config_errors(device, env, match, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=match):
        init_distributed(device)


# ---------------------------------------------------------------------------------------------
# srun without torchrun: SLURM's variables as torchrun's


@pytest.mark.parametrize("nodelist,first", [("gpu[07-09,12],cpu1", "gpu07"), ("node1", "node1"),
                                            ("a-b[1,3]", "a-b1"), ("x[001-004]", "x001"), ("n1,n2", "n1")])
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    from beseg.engine.distributed import first_host

    assert first_host(nodelist) == first


def test_srun_tasks_map_to_ranks_of_one_run_and_the_batch_step_stays_one_process():
    from beseg.engine.distributed import launch_env

    task = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-09]",
            "SLURM_JOB_ID": "5120"}
    env = launch_env(task)
    assert (env.rank, env.world_size, env.local_rank, env.source, env.master_addr) == (3, 4, 1, "slurm", "gpu07")
    assert launch_env({**task, "SLURM_PROCID": "0"}).master_port == env.master_port  # every task meets at one port
    assert launch_env({**task, "SLURM_JOB_ID": "5121"}).master_port != env.master_port  # another job, another port
    assert launch_env({**task, "MASTER_PORT": "29999"}).master_port == 29999
    batch = {k: v for k, v in task.items() if not k.startswith("SLURM_STEP")}  # the job script itself
    assert launch_env(batch).world_size == 1
    torchrun = launch_env({**task, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.world_size, torchrun.source) == (1, 2, "torchrun")  # torchrun wins
