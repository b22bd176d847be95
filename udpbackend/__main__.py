"""`python -m udpbackend`: the same entry point as the `udpbackend` command.
Nothing else lives here.
"""

from .cli import main

raise SystemExit(main())
