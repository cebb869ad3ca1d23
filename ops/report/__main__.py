"""``python -m ops.report``: build the report (flags in :func:`ops.report.build.main`)."""

from __future__ import annotations

from ops.report.build import main

raise SystemExit(main())
