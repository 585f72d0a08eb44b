"""Commands that run from a checkout: thin scripts over the installed package's entry points.

``python -m launch.run`` is ``python -m dist_memopt.train.run`` (console script ``dist-memopt-run``),
``python -m launch.pretrain`` is ``dist_memopt.train.pretrain`` and ``python -m launch.build_dataset``
is ``dist_memopt.train.build_dataset``. This folder is not part of the wheel.
"""
