"""gunicorn settings for the web app (`worklist web` or `gunicorn -c gunicorn.conf.py wsgi:app`)."""

import multiprocessing
import os

bind = os.environ.get("WORKLIST_WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WORKLIST_WEB_WORKERS", multiprocessing.cpu_count() * 2 + 1))
threads = int(os.environ.get("WORKLIST_WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 30
graceful_timeout = 30
keepalive = 5
accesslog = "-"
# Each worker builds its own app and engine after the fork (no preload), so no
# database connection is ever shared between processes.
preload_app = False


def post_fork(server, worker):  # noqa: ARG001
    # If someone turns preload_app on, drop connections inherited from the master.
    import sys

    wsgi = sys.modules.get("wsgi")
    if wsgi is not None:
        wsgi.app.extensions["worklist.runtime"].engine.dispose(close=False)


def post_worker_init(worker):  # noqa: ARG001
    # The worker has built its app: leave start-up objects out of garbage collections.
    from worklist.bootstrap import settle_after_start_up

    settle_after_start_up()
