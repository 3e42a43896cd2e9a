"""``python -m dsv4_nvfp4 COMMAND ...``: the same as the ``dsv4-nvfp4`` console script."""

import sys

from dsv4_nvfp4.cli import main

sys.exit(main())
