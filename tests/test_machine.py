"""Choices made by measuring the machine: the precision `--precision auto` takes on a CPU (timed,
then cached per CPU) and the threads a command computes with when other jobs already run."""

import json

import pytest
import torch

from cxr.cli import main
from cxr.training import machine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "cxr" / "precision.json"


def test_bf16_is_taken_only_where_it_trains_clearly_faster(cache):
    for rates, choice in (({"fp32": 16.8, "bf16": 12.2}, "fp32"),  # AVX-512 BF16 without AMX, one Xeon
                          ({"fp32": 30.8, "bf16": 55.2}, "bf16"),  # an AMD EPYC with AVX-512 BF16
                          ({"fp32": 20.0, "bf16": 22.0}, "fp32")):  # 1.1x: not worth bf16's rounding
        cache.unlink(missing_ok=True)
        chosen, why = machine.measured_cpu_precision(lambda: rates, busy=lambda: 0)
        assert chosen == choice, (rates, why)
        assert "measured now" in why and str(cache) in why and f"{rates['bf16'] / rates['fp32']:.2f}x" in why


def test_the_measurement_is_cached_per_cpu_and_thread_count(cache, monkeypatch):
    calls = []

    def measure():
        calls.append(1)
        return {"fp32": 10.0, "bf16": 30.0}

    assert machine.measured_cpu_precision(measure, busy=lambda: 0)[0] == "bf16"
    chosen, why = machine.measured_cpu_precision(lambda: pytest.fail("measured twice"))
    assert chosen == "bf16" and "cached" in why and len(calls) == 1
    assert list(json.loads(cache.read_text())) == [machine.cpu_key()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count trains at another speed: measured anew
        machine.measured_cpu_precision(measure, busy=lambda: 0)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_an_unreadable_cache_is_measured_again(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("not json")
    assert machine.measured_cpu_precision(lambda: {"fp32": 10.0, "bf16": 5.0}, busy=lambda: 0)[0] == "fp32"
    assert json.loads(cache.read_text())[machine.cpu_key()] == {"fp32": 10.0, "bf16": 5.0}


def test_a_measurement_beside_other_jobs_is_used_once_not_cached(cache):
    chosen, why = machine.measured_cpu_precision(lambda: {"fp32": 10.0, "bf16": 30.0}, busy=lambda: 2)
    assert chosen == "bf16" and "beside 2 other running task(s), so not cached" in why and not cache.exists()


def test_under_cxr_ignore_load_the_first_measurement_is_kept_whatever_runs_beside(cache, monkeypatch):
    """The tests' setting: processes a test compares must compute in the same precision, so a
    session keeps its first measurement even on a loaded machine (CI shares its cores)."""
    monkeypatch.setattr(machine, "busy_cores", lambda: 3)
    monkeypatch.setenv("CXR_IGNORE_LOAD", "1")
    chosen, why = machine.measured_cpu_precision(lambda: {"fp32": 10.0, "bf16": 30.0})
    assert chosen == "bf16" and "cached in" in why and cache.exists()
    assert machine.measured_cpu_precision(lambda: {"fp32": 30.0, "bf16": 10.0})[0] == "bf16"  # the kept answer
    monkeypatch.delenv("CXR_IGNORE_LOAD")
    cache.unlink()
    assert "so not cached" in machine.measured_cpu_precision(lambda: {"fp32": 10.0, "bf16": 30.0})[1]


def test_the_probe_times_real_training_steps_in_both_precisions():
    rates = machine.training_rates(size=32, batch=2, steps=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())


def test_threads_left_by_other_jobs():
    assert machine.busy_threads(2, 0, 2) is None  # quiet: torch's default
    assert machine.busy_threads(2, 1, 2) == 1
    assert machine.busy_threads(2, 5, 2) == 1  # never none
    assert machine.busy_threads(16, 4, 16) == 12
    assert machine.busy_threads(1, 3, 1) is None  # one core: one thread already
    # 8 cores with 2 hardware threads each: torch takes 8; one other task leaves 15 logical cores,
    # which is not fewer than the default, so the default stands
    assert machine.busy_threads(16, 1, 8) is None and machine.busy_threads(16, 10, 8) == 6


def test_other_tasks_are_counted_from_the_runnable_column_of_loadavg(tmp_path, monkeypatch):
    loadavg, none = tmp_path / "loadavg", tmp_path / "no-cgroup"  # no quota: the machine's count is ours
    monkeypatch.setattr(machine, "usable_cores", lambda: 4)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 4)
    loadavg.write_text("0.50 0.40 0.30 3/120 4567\n")  # 3 runnable: this process and 2 others
    assert machine.busy_cores(samples=3, interval=0, loadavg=loadavg, cgroup=none) == 2
    loadavg.write_text("0.50 0.40 0.30 1/120 4567\n")
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=none) == 0
    loadavg.write_text("garbled")
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=none) == 0
    # an allocation of some of the machine's cores (Slurm, cpuset, taskset): the machine-wide count
    # says nothing about our cores, so nothing is counted
    loadavg.write_text("9.0 9.0 9.0 40/500 4567\n")
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 64)
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=none) == 0


def test_a_containers_cpu_quota_makes_the_machine_wide_count_meaningless(tmp_path, monkeypatch):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("9.0 9.0 9.0 40/500 4567\n")  # the host's tasks, seen from inside a container
    monkeypatch.setattr(machine, "usable_cores", lambda: 4)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 4)
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    none.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert machine.cpu_quota(v2) == 2.0 and machine.cpu_quota(v1) == 1.5 and machine.cpu_quota(none) is None
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=v2) == 0
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=v1) == 0
    assert machine.busy_cores(samples=1, interval=0, loadavg=loadavg, cgroup=none) == 39
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota set
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert machine.cpu_quota(v2) is None and machine.cpu_quota(v1) is None


def test_a_cpu_quota_caps_the_threads_at_what_it_grants(monkeypatch, capsys, tmp_path):
    assert machine.quota_threads(2.0, 32) == 2 and machine.quota_threads(1.5, 32) == 2
    assert machine.quota_threads(0.5, 4) == 1 and machine.quota_threads(8.0, 4) is None
    for name in ("CXR_IGNORE_LOAD", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(machine, "busy_cores", lambda: 0)
    monkeypatch.setattr(machine, "cpu_quota", lambda: 1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["evaluate", str(tmp_path / "no-run"), "--no-cache"]) == 2  # fails after the threads are set
        assert torch.get_num_threads() == 1
        assert "this container may use 1 CPU (its cgroup quota): computing with 1 thread instead of 2" in \
            capsys.readouterr().err
        torch.set_num_threads(2)
        main(["evaluate", str(tmp_path / "no-run"), "--no-cache", "--threads", "2"])  # the user's word stands
        assert torch.get_num_threads() == 2 and "its cgroup quota" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_machine_gets_the_cores_left_and_is_told(monkeypatch, capsys, tmp_path, threads_restored):
    for name in ("CXR_IGNORE_LOAD", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(machine, "busy_cores", lambda: 1)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    assert main(["evaluate", str(tmp_path / "no-run"), "--no-cache"]) == 2  # fails after the threads are set
    assert torch.get_num_threads() == 1
    assert "1 other task running on this machine's 2 cores: computing with 1 thread instead of 2" in \
        capsys.readouterr().err

    torch.set_num_threads(2)  # the user's word stands
    main(["evaluate", str(tmp_path / "no-run"), "--no-cache", "--threads", "2"])
    assert torch.get_num_threads() == 2 and "other task" not in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    main(["evaluate", str(tmp_path / "no-run"), "--no-cache"])
    assert torch.get_num_threads() == 2 and "other task" not in capsys.readouterr().err
