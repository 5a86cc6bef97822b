"""``python -m trajlab.cli``: the same as the ``trajlab`` command."""

import sys

from trajlab.cli import main

sys.exit(main())
