"""``python -m launch.run`` from a checkout: runs :mod:`dist_memopt.train.run` (console script ``dist-memopt-run``)."""

import sys

from dist_memopt.train.run import main

if __name__ == "__main__":
    sys.exit(main())
