"""`python -m offload.tools` is the `offload` command."""

import sys

from offload.tools.cli import main

sys.exit(main())
