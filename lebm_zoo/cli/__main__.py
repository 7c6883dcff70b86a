"""``python -m lebm_zoo.cli``: the ``lebm-zoo`` command."""
import sys

from lebm_zoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
