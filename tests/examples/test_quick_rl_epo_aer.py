"""CI smoke runs of the EPO and AER reproductions (``examples/rl_epo_gridworld.py``,
``examples/rl_aer_mixed_difficulty.py``) in their ``--quick`` mode, with the checks of
:mod:`tests.examples.test_quick_rl` (exit code 0, one smoke-tagged verdict line, a PNG)."""

from __future__ import annotations

import pytest
from tests.examples.test_quick_rl import test_rl_example_quick_mode as _check_quick_mode

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("script", ["rl_epo_gridworld.py", "rl_aer_mixed_difficulty.py"])
def test_rl_epo_aer_quick_mode(script, tmp_path):
    _check_quick_mode(script, tmp_path)
