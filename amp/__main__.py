"""``python -m amp``: the ``amp`` command (see :mod:`amp.cli`)."""

import sys

from amp.cli import main

if __name__ == "__main__":
    sys.exit(main())
