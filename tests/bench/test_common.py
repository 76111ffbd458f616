"""The benchmarks' shared helpers (entrokit.bench.common): running a call in a child
process killed at a wall-clock or CPU-time limit."""

import os
import time

import numpy as np
import pytest

from entrokit.bench.common import TimeLimitExceeded, call_with_time_limit


def test_call_with_time_limit_returns_the_childs_value_and_raises_its_errors():
    pid = os.getpid()
    assert call_with_time_limit(lambda: (os.getpid() != pid, np.arange(3)), 30)[0] is True
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        call_with_time_limit(lambda: 1 / 0, 30)
    with pytest.raises(TimeLimitExceeded, match="killed after 0.2 s"):
        call_with_time_limit(lambda: time.sleep(30), 0.2)
    with pytest.raises(RuntimeError, match="child process died"):
        call_with_time_limit(lambda: os._exit(3), 30)
    # a CPU-time limit: the kernel ends a computing child; a waiting one meets the wall backstop
    with pytest.raises(TimeLimitExceeded, match="killed after 1 s of CPU time"):
        call_with_time_limit(lambda: sum(1 for _ in iter(int, 1)), 0.5, cpu=True)
    with pytest.raises(TimeLimitExceeded, match="killed after 0.5 s"):
        call_with_time_limit(lambda: time.sleep(30), 0.05, cpu=True)
    assert call_with_time_limit(lambda: 7, 1, cpu=True) == 7
