"""ferry's benchmark harness: `python -m bench SUBCOMMAND`, ratios measured in the same run."""
