"""The command line: the parser (main.py), what each command does (commands.py), and what every stage uses to
talk to the terminal: console.py (log lines, stderr filtering), progress.py, tables.py."""

from .main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
