"""Head structures: how the heads of one attention layer are built, shared, routed or mixed."""
