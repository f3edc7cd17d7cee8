"""gunicorn.conf.py: each web worker, once it has built its app, leaves the start-up
objects out of later garbage collections (a full collection walked them all: 15-40 ms
on a request now and then; bench/worklist's sixth-session record)."""

from __future__ import annotations

import gc
import runpy
from pathlib import Path

CONF = Path(__file__).parents[2] / "gunicorn.conf.py"


def test_a_worker_freezes_its_start_up_objects_once_its_app_is_built() -> None:
    conf = runpy.run_path(str(CONF))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        conf["post_worker_init"](None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
