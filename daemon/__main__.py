"""`python -m daemon`: the `baton` command line (daemon.cli), for a machine without the console script on PATH."""

import sys

from daemon.cli import main

sys.exit(main())
