"""The `serve` command's flags and its early errors (no server is started here)."""

from __future__ import annotations

from typer.testing import CliRunner

from codeshell.serve.cli import app


def test_help_lists_the_flags():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for flag in ("--model", "--host", "--port", "--api-key", "--max-batch", "--max-queue", "--max-model-len",
                 "--cors-origin", "--dtype", "--device", "--no-warmup"):
        assert flag in r.output, flag


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["--model", str(tmp_path / "nope")])
    assert r.exit_code != 0
    assert "no checkpoint folder" in r.output


def test_bad_port_is_refused():
    r = CliRunner().invoke(app, ["--model", "x", "--max-batch", "0"])
    assert r.exit_code != 0


def _mounted():
    """`app` mounted with add_typer beside another command, as the project CLI mounts it."""
    import typer
    root = typer.Typer()

    @root.command()
    def other() -> None:
        pass

    root.add_typer(app, name="serve")
    return root


def test_mounts_as_a_subcommand():
    """The project CLI mounts `app` with add_typer: `codeshell serve --model ...` must work."""
    root = _mounted()
    r = CliRunner().invoke(root, ["serve", "--model", "/nonexistent/x"])
    assert r.exit_code != 0 and "no checkpoint folder" in r.output


def test_help_shows_no_command_placeholder():
    """`serve` has no subcommands: its usage line must not promise `COMMAND [ARGS]...`, mounted or not."""
    root = _mounted()
    for runner_app, argv in ((app, ["--help"]), (root, ["serve", "--help"])):
        r = CliRunner().invoke(runner_app, argv, terminal_width=100)
        assert r.exit_code == 0, r.output
        usage = next(line for line in r.output.splitlines() if "Usage:" in line)
        assert "[OPTIONS]" in usage and "COMMAND" not in usage, usage
        assert "Commands" not in r.output
