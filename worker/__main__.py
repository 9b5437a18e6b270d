"""`python -m worker` is `genworker`."""

from worker.cli import main

raise SystemExit(main())
