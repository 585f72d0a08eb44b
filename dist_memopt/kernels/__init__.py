"""Fused step kernels (Triton) and the observer API through which kernel runners report their launches.

Importing this package does not import Triton; :mod:`.select` decides per parameter group
whether the Triton kernels run (``kernel="auto" | "torch" | "triton"``).
"""
