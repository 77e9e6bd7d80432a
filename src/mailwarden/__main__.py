"""`python -m mailwarden` is the `mailwarden` command."""

from mailwarden.cli import main

raise SystemExit(main())
