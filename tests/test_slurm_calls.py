"""The retry policy of SLURM calls (:mod:`beseg.slurm_calls`); the calls themselves, against fake ``squeue``/``sbatch``
binaries that hang or fail, are in ``tests/faults/test_faults_slurm_commands.py``."""

from __future__ import annotations

import pytest

from beseg.errors import ConfigError
from beseg.slurm_calls import SlurmRetry


def test_pauses_double_from_the_first_and_stop_at_the_longest():
    assert SlurmRetry(attempts=5, backoff_s=2, max_backoff_s=60).delays() == [2, 4, 8, 16]
    assert SlurmRetry(attempts=6, backoff_s=10, max_backoff_s=30).delays() == [10, 20, 30, 30, 30]
    assert SlurmRetry(attempts=1).delays() == []


def test_the_policy_is_read_from_the_environment():
    policy = SlurmRetry.from_env({"BESEG_SLURM_ATTEMPTS": "3", "BESEG_SLURM_TIMEOUT_S": "7.5",
                                  "BESEG_SLURM_BACKOFF_S": "0.5"})
    assert (policy.attempts, policy.timeout_s, policy.backoff_s) == (3, 7.5, 0.5)
    default = SlurmRetry.from_env({})
    assert (default.attempts, default.timeout_s, default.backoff_s) == (5, 60.0, 2.0)


@pytest.mark.parametrize("env, message", [
    ({"BESEG_SLURM_ATTEMPTS": "0"}, "at least 1 attempt, got 0 (BESEG_SLURM_ATTEMPTS)"),
    ({"BESEG_SLURM_ATTEMPTS": "two"}, "BESEG_SLURM_ATTEMPTS='two': expected an integer"),
    ({"BESEG_SLURM_TIMEOUT_S": "0"}, "timeout must be > 0 s, got 0.0 (BESEG_SLURM_TIMEOUT_S)"),
    ({"BESEG_SLURM_BACKOFF_S": "-1"}, "pause must be between 0 and 60.0 s, got -1.0 (BESEG_SLURM_BACKOFF_S)"),
])
def test_a_bad_setting_is_refused_naming_its_variable(env, message):
    with pytest.raises(ConfigError) as info:
        SlurmRetry.from_env(env)
    assert message in str(info.value)
