"""`python -m surgery ...` and `accelerate launch -m surgery heads ...`."""

from surgery.cli import main

raise SystemExit(main())
