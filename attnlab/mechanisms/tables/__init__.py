"""Tables: attention over a table of datapoints × attributes, (batch, rows, attributes, dim) -> the same shape."""
