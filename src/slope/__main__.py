"""`python -m slope ...` runs the `slope` command (also under `torchrun -m slope`)."""

import sys

from slope.cli.main import main

sys.exit(main())
