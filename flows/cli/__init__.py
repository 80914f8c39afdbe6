"""The `stemworks` command line: `separate`, `catalog query|export|rebuild`, `model random`."""

from flows.cli.main import main

__all__ = ["main"]
