"""`python -m llamalora …` runs the same commands as the `llamalora` script."""

from .cli import cli

if __name__ == "__main__":
    cli()
