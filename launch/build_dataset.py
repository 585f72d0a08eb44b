"""``python -m launch.build_dataset`` from a checkout: runs :mod:`dist_memopt.train.build_dataset` (console script ``dist-memopt-build-dataset``)."""

import sys

from dist_memopt.train.build_dataset import main

if __name__ == "__main__":
    sys.exit(main())
