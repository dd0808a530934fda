"""Subcommands of the ``peg-rag`` command line, one module each."""
