import sys

from dist_memopt.bench.cli import main

sys.exit(main())
