"""``python -m launch.pretrain`` from a checkout: runs :mod:`dist_memopt.train.pretrain` (console script ``dist-memopt-pretrain``)."""

import sys

from dist_memopt.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
