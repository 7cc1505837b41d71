"""WSGI entry point for gunicorn: ``gunicorn webhooks.wsgi:app``. Settings are read here, once."""

from webhooks import create_app
from worker.config import get_settings

app = create_app(get_settings())
