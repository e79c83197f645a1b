"""sample_temperature_rows' rows on the process's decode team (csrc/sampling.cpp, session 22 D):
the same picks as one row at a time, with the team (default), with CODESHELL_SAMPLE_ROWS_TEAM=off
(the OpenMP region as before), at 1 and 2 threads, and while another call holds the team."""

import pytest
import torch

from codeshell.kernels import _ext

needs_native = pytest.mark.skipif(_ext.get() is None, reason="native kernels unavailable")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("mode", ["team", "off"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_on_team_same_picks(mode, threads, monkeypatch):
    mod = _ext.get()
    if mode == "off":
        monkeypatch.setenv("CODESHELL_SAMPLE_ROWS_TEAM", "off")
    else:
        monkeypatch.delenv("CODESHELL_SAMPLE_ROWS_TEAM", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        base = (torch.randn(16, 4099, generator=g) * 3).bfloat16()
        base[2, 1::3] = float("-inf")
        for rows in (base, base[::3], base[:4], base.float()):
            B = rows.shape[0]
            t = torch.tensor([0.3 + 0.1 * i for i in range(B)], dtype=torch.float64)
            u = torch.rand(B, generator=g, dtype=torch.float64)
            want = [mod.sample_temperature(rows[i].float().contiguous(), float(t[i]), float(u[i])) for i in range(B)]
            for _ in range(3):  # repeated calls: the helper spinning, then asleep
                assert mod.sample_temperature_rows(rows, t, u).tolist() == want
    finally:
        torch.set_num_threads(before)


@needs_native
def test_rows_while_team_held_elsewhere(two_threads):
    """Called inside run_in_team (the calling thread is then the team's master: current_team()
    set), the rows take the OpenMP path; the same picks."""
    mod = _ext.get()
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(8, 2000, generator=g).bfloat16()
    t = torch.full((8,), 0.7, dtype=torch.float64)
    u = torch.rand(8, generator=g, dtype=torch.float64)
    want = [mod.sample_temperature(rows[i].float().contiguous(), 0.7, float(u[i])) for i in range(8)]
    res = mod.run_in_team(lambda: mod.sample_temperature_rows(rows, t, u).tolist())
    if res is False:
        pytest.skip("no team (1 thread or held by another thread)")
    assert res[0] == want
