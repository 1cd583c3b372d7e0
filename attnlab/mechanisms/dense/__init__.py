"""Dense attention: softmax attention and its positional schemes."""
