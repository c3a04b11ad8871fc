"""`python -m loralens.flows.cli ...`: the `loralens` command."""

import sys

from loralens.flows.cli import main

sys.exit(main())
