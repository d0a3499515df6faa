"""What ``serve``'s start-up leaves behind, in process: the objects it made, frozen out of the collector's sight."""

from __future__ import annotations

import gc

from runledger.streams.http.app import create_app
from tests.integration.conftest import settings_of
from tests.integration.httpapi.serving import migrated


async def test_start_up_freezes_what_it_made_so_full_collections_stay_short(env: dict[str, str]) -> None:
    """Unfrozen, a full collection scanned the app's 100,000 objects: 35-42 ms pauses, four in 9 s at 500/s."""
    app = create_app(settings_of({**await migrated(env), "RUNLEDGER_METRICS_PORT": "0"}))
    gc.unfreeze()
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
