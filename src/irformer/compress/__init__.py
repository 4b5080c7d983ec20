"""Compression: fake quantisation, Hadamard rotation, pruning, packing, statistics.

Implements CompSRT (Hadamard rotation + scalar decomposition + magnitude
pruning on top of 2DQuant) and its baselines, plus the weight-only int8/int4
quantisation used by the low-precision feature. Submodules are imported
explicitly (``from irformer.compress.quantizers import ...``) so that importing
the package stays cheap.
"""
