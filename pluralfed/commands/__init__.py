"""Subcommands of the `pluralfed` CLI, one module each."""
