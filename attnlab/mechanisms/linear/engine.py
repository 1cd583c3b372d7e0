"""The old path of `attnlab.kernels.linear_scan`: importing it gives that very module (patching it patches the kernel).

Import `attnlab.kernels.linear_scan` instead; this alias goes once the tests and the bench have switched.
"""
import sys

from ...kernels import linear_scan

sys.modules[__name__] = linear_scan
