"""`python -m tcpguard.devtools.bench`: the command on its own, and how the load generator's roles start
inside the namespaces (`_role NAME PARAMS`)."""

import sys

from tcpguard.devtools.bench.command import main

sys.exit(main())
