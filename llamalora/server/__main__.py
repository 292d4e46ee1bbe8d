"""`python -m llamalora.server`: the server command on its own, with the CLI's one-line errors."""

import sys

import click

from ..errors import LlamaLoraError
from .cli import server_command

if __name__ == "__main__":
    try:
        server_command(standalone_mode=True)
    except LlamaLoraError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
