"""The --ab variants of the decode-step benchmarks (bench_decode_step.py --profile, bench_loaded.py).

A variant is '-' (as loaded: the defaults), `team=N` (the native decode step's thread team,
`DecodeStep.team`, set on the built step; the last one given wins) and / or comma-separated
ENV=V settings the kernels read per call (CODESHELL_Q8R_ASM=0, ...), e.g. `team=0,CODESHELL_CHUNKS_TEAM=1`.
What this is not: bench_kernels.py's --sweep variants (environment only; `set_env`, which this uses).
"""

from __future__ import annotations

from bench_kernels import set_env

HELP = "'-' (as loaded), team=0|1|2, or ENV=V[,ENV=V] the kernels read per call (combinable: team=1,ENV=V)"


def add_ab_argument(ap, default: list[str], help: str = HELP) -> None:
    """The --ab option: one or more variants, alternating round by round in one process."""
    ap.add_argument("--ab", nargs="+", default=default, metavar="VARIANT", help=help)


def parse_variant(v: str) -> tuple[int | None, str]:
    """'-' or 'team=N,ENV=V,...' -> (the team, or None for the step's own; the ENV=V part for set_env)."""
    items = [] if v == "-" else v.split(",")
    teams = [int(kv.split("=", 1)[1]) for kv in items if kv.startswith("team=")]
    return (teams[-1] if teams else None), ",".join(kv for kv in items if not kv.startswith("team="))


def apply_variant(v: str, step, team0: int, env0: dict[str, str]) -> None:
    """Set variant `v` on the built decode step and the environment (`env0` plus its ENV=V settings)."""
    team, env = parse_variant(v)
    step.team = team0 if team is None else team
    set_env(env, env0)


def restore(step, team0: int, env0: dict[str, str]) -> None:
    """Back to the step's own team and the environment as it was (`env0`)."""
    set_env("-", env0)
    step.team = team0
