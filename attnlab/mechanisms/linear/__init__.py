"""Linear, kernelised and recurrent attention: a d_k × d_v state instead of the N × N matrix (engine in `engine.py`)."""
