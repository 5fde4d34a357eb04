"""One module per group of `ferry` subcommands, each with `add_parser(subparsers)`."""
