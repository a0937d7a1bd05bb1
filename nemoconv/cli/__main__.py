"""`python -m nemoconv.cli …` runs the command line (the tests call it this way)."""

from nemoconv.cli.app import run

run()
