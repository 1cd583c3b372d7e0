"""Position schemes that are more than a score term on softmax attention: gated positional heads, periodic biases."""
