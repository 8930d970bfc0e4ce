"""`python -m forecastd ...` runs the CLI, as the `forecastd` console script does."""

from forecastd.cli import main

if __name__ == "__main__":
    main()
