"""The registered claims (importing this package registers them as catalogue entries of kind "repro")."""
from . import cost, depth, explain, structure, synthetic_tasks, learning_dynamics, recipes, sinks  # noqa: F401  (importing registers the claims)
