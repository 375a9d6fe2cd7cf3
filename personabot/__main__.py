"""`python -m personabot` runs the `personabot` command."""

from personabot.cli import main

raise SystemExit(main())
