"""The old path of `attnlab.kernels.block_sparse`: importing it gives that very module (patching it patches the kernel).

Import `attnlab.kernels.block_sparse` instead; this alias goes once the tests and the bench have switched.
"""
import sys

from ...kernels import block_sparse

sys.modules[__name__] = block_sparse
