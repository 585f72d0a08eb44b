import os
import sys

here = os.path.dirname(__file__)
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(os.path.dirname(here), "distributed"))  # the gloo harness
