"""Kernel tests: at the end of the session, name the CPU features and the kernel paths (ISA)
that actually ran, so a test log says which instruction sets were checked on this machine; and the
`threads` fixture the AMX tests share (each case on 1 and on 2 threads: the kernels split work
over the team, and a row's bits must not depend on the split)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from codeshell.kernels import _ext, ops
    if "mod" not in _ext._state:  # nothing built or asked for in this session
        return
    tr = terminalreporter
    tr.section("codeshell.kernels: ISA paths run")
    feats = _ext.features()
    if feats.get("max_isa", -1) < 0:
        tr.write_line(f"native kernels unavailable ({_ext.unavailable_reason()}): torch fallback only")
        return
    flags = [k for k, v in feats.items() if v is True]
    import os
    cap = os.environ.get("CODESHELL_KERNEL_ISA")
    tr.write_line(f"cpu features: {' '.join(flags)}; highest kernel ISA: {ops.ISA_LEVELS[feats['max_isa']]}"
                  + (f", dispatch capped at {cap} (CODESHELL_KERNEL_ISA)" if cap else ""))
    for (kind, path), calls in sorted(ops.PATHS_RUN.items()):
        tr.write_line(f"  {kind:5} {path:22} {calls:6d} calls")
