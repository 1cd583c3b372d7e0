"""`python -m attnlab ...` runs the `attnlab` command."""
from .cli import main

raise SystemExit(main())
