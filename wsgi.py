"""The gunicorn target: `gunicorn wsgi:app`. Builds the app; starts no listener or scheduler."""

from worklist import create_app

app = create_app()
