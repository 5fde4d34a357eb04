"""`python -m agent` is the `ferry` command."""

import sys

from agent.cli import main

sys.exit(main())
