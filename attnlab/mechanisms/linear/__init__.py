"""Linear, kernelised and recurrent attention: a d_k × d_v state instead of the N × N matrix (engine in `attnlab.kernels.linear_scan`, module base in `base.py`)."""
