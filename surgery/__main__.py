"""`python -m surgery ...` and `accelerate launch -m surgery heads ...`."""

from .cli import main

raise SystemExit(main())
