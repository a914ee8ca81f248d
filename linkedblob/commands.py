"""Client commands of the CLI (push, pull, stat, mount, ls, rm), built on linkedblob.client."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    """Adds the client commands to the CLI (filled in with the gateway)."""
