"""``python -m distsum`` is the ``distsum`` command."""

import sys

from distsum._cli import main

sys.exit(main())
