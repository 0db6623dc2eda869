"""CLI subcommands, one module each (see daemon.cli)."""
