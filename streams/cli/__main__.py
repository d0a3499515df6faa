"""``python -m runledger.streams.cli``: the same as the ``runledger`` command."""

import sys

from runledger.streams.cli import main

sys.exit(main())
