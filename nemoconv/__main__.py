"""`python -m nemoconv …` runs the command line, like the `nemoconv` script."""

from nemoconv.cli.app import run

if __name__ == "__main__":
    run()
