"""`python -m difftune` is the `difftune` command."""

import sys

from difftune.cli import main

sys.exit(main())
