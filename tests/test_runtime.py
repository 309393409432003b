"""ingest.runtime.freeze_startup_heap: the worker's start-up objects leave the cyclic GC."""

from __future__ import annotations

import gc

from ingest.runtime import freeze_startup_heap


def test_freezing_moves_what_exists_now_out_of_the_collectors_generations() -> None:
    gc.unfreeze()
    try:
        kept = [[i] for i in range(1000)]  # containers the collector tracks
        tracked = len(gc.get_objects())
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count()
        assert frozen >= tracked - 100  # (the call itself allocates a little)
        assert len(gc.get_objects()) < 100  # the generations hold almost nothing now
        later = [[i] for i in range(50)]
        assert gc.get_freeze_count() == frozen  # later objects are collected as before
        assert any(o is later[0] for o in gc.get_objects())
        assert not any(o is kept[0] for o in gc.get_objects())
    finally:
        gc.unfreeze()
