"""WSGI entry point: ``gunicorn wsgi:app`` and the ``flask`` CLI (found here by default)."""

from app import create_app

app = create_app()
