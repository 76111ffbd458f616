"""Solver loops of small problems run on one thread and restore the caller's setting."""

import pytest
import torch

import entrokit
from entrokit import InputError
from entrokit._threads import SERIAL_MAX_ENTRIES, serial_max_entries, solver_threads

D = torch.float64


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _cost(n=256, seed=0):
    return torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_context_switches_small_problems_and_restores(two_threads):
    with solver_threads(1000):
        assert torch.get_num_threads() == 1
        with solver_threads(1000):  # nested: already one thread
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with solver_threads(SERIAL_MAX_ENTRIES):  # at the threshold: the caller's setting
        assert torch.get_num_threads() == 2
    with solver_threads(10, "meta"):  # CPU only
        assert torch.get_num_threads() == 2


def test_context_restores_after_an_exception(two_threads):
    with pytest.raises(ZeroDivisionError):
        with solver_threads(10):
            assert torch.get_num_threads() == 1
            raise ZeroDivisionError
    assert torch.get_num_threads() == 2


def test_environment_threshold(two_threads, monkeypatch):
    monkeypatch.setenv("ENTROKIT_SERIAL_MAX_ENTRIES", "0")
    assert serial_max_entries() == 0
    with solver_threads(10):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("ENTROKIT_SERIAL_MAX_ENTRIES", "many")
    with pytest.raises(InputError, match="ENTROKIT_SERIAL_MAX_ENTRIES must be a number of cost entries, got 'many'"):
        solver_threads(10)


@pytest.mark.filterwarnings("ignore::entrokit.ConvergenceWarning")  # 200 iterations
@pytest.mark.parametrize("method", ["sinkhorn", "ssns", "sns"])
def test_solver_loops_run_on_one_thread(two_threads, method):
    # issue 19: 256 x 256 U[0,1] at eps = 1e-3 was 70-100x slower with torch's default 2
    # threads on a loaded machine; the loop of a problem this small runs on one thread
    seen = []
    res = entrokit.solve(None, None, _cost(), eps=1e-3, method=method, max_iter=200,
                         callback=lambda it, err: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert res.method == method


def test_large_problems_keep_the_callers_threads(two_threads, monkeypatch):
    monkeypatch.setenv("ENTROKIT_SERIAL_MAX_ENTRIES", str(100))
    seen = []
    entrokit.sinkhorn(None, None, _cost(20), eps=0.1, callback=lambda it, err: seen.append(torch.get_num_threads()))
    assert set(seen) == {2}


def test_solver_restores_threads_when_the_loop_raises(two_threads):
    def stop(it, err):
        raise KeyboardInterrupt

    for method in ("sinkhorn", "ssns"):
        with pytest.raises(KeyboardInterrupt):
            entrokit.solve(None, None, _cost(30), eps=1e-2, method=method, callback=stop)
        assert torch.get_num_threads() == 2


def test_single_thread_gives_the_same_result(two_threads):
    C = _cost(64, 1)
    res = entrokit.solve(None, None, C, eps=1e-2, method="sinkhorn")
    torch.set_num_threads(1)
    ref = entrokit.solve(None, None, C, eps=1e-2, method="sinkhorn")
    assert torch.equal(res.f, ref.f) and torch.equal(res.g, ref.g)
