"""`python -m edgeproxy`: the same as the `edgeproxy` command."""

import sys

from .cli import main

sys.exit(main())
