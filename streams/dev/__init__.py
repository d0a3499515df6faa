"""Dev tooling: the embedded stack, the simulated fleet, the demo and the benchmark."""

import sys

# A worker as a child process of this interpreter, as the demo and the benchmark start it.
WORKER_COMMAND = (sys.executable, "-m", "runledger.streams.cli", "worker")
