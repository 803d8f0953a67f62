"""``python -m innsteer.cli``: the ``innsteer`` command without its console script."""

import sys

from .main import main

sys.exit(main())
