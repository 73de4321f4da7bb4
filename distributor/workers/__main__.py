"""Entry point of worker processes: ``python -m distributor.workers --slot N --table NAME``.

SIGINT comes blocked (the supervisor spawns workers with it masked, so even the
interpreter's own start is covered) and is ignored before anything else is
imported: the supervisor owns Ctrl-C (it turns it into SIGTERM for its workers),
and a worker interrupted while importing would print a traceback into the
operator's terminal instead.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import sys  # noqa: E402

from distributor.workers.ingest_worker import main  # noqa: E402

sys.exit(main())
