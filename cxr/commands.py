"""What every `python -m ...` command of the project starts from."""

from __future__ import annotations

import argparse


def command_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows the module docstring as written (usage lines, lists)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
