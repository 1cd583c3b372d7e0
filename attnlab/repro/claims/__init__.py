"""The registered claims (importing this package registers them as catalogue entries of kind "repro")."""
from . import cost, depth, explain, interpretability, learning_dynamics, recipes, sinks, structure, synthetic_tasks  # noqa: F401  (importing registers the claims)
