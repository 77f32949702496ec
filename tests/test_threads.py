"""The command line's torch thread count: the user's choice first, else every physical core split between the
processes on the machine, also under `accelerate launch` (which exports OMP_NUM_THREADS=1)."""

from __future__ import annotations

import pytest

from diffusion_pref_trainers.threads import choose_num_threads, physical_cores

LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO"}  # what `accelerate launch` exports to every process


def test_plain_python_gets_every_physical_core() -> None:
    assert choose_num_threads({}, cores=8)[0] == 8


def test_accelerates_default_of_one_thread_is_replaced_by_the_cores() -> None:
    assert choose_num_threads({**LAUNCHED, "OMP_NUM_THREADS": "1"}, cores=8)[0] == 8


def test_a_multi_process_launch_splits_the_cores_between_local_processes() -> None:
    environ = {**LAUNCHED, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}
    assert choose_num_threads(environ, cores=8)[0] == 2
    assert choose_num_threads({**environ, "LOCAL_WORLD_SIZE": "16"}, cores=8)[0] == 1


@pytest.mark.parametrize("environ", [{"OMP_NUM_THREADS": "1"}, {**LAUNCHED, "OMP_NUM_THREADS": "3"}])
def test_an_omp_num_threads_the_user_chose_is_kept(environ: dict[str, str]) -> None:
    count, reason = choose_num_threads(environ, cores=8)
    assert count is None and "user" in reason


def test_dpt_num_threads_wins_over_everything() -> None:
    environ = {**LAUNCHED, "OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2", "DPT_NUM_THREADS": "5"}
    assert choose_num_threads(environ, cores=8)[0] == 5


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_dpt_num_threads_names_the_variable_and_the_fix(value: str) -> None:
    with pytest.raises(ValueError, match="DPT_NUM_THREADS.*whole number"):
        choose_num_threads({"DPT_NUM_THREADS": value}, cores=8)


def test_physical_cores_is_at_least_one() -> None:
    assert physical_cores() >= 1
