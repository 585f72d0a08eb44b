"""Fused step kernels (Triton) and the bookkeeping that counts their launches and bytes.

Importing this package does not import Triton; :mod:`.select` decides per parameter group
whether the Triton kernels run (``kernel="auto" | "torch" | "triton"``).
"""
