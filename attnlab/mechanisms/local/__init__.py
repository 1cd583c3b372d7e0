"""Local attention: neighborhood attention (1/2/3-D, dilation, causal) and other windowed patterns."""
