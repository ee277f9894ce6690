"""A signup service, twice: as a FastAPI app and as a Flask app, sharing models and jobs.

Each signup creates a user row and defers ``send_welcome`` in the same
transaction: no user without a welcome mail, no welcome mail for a signup that
failed. See ``fastapi_app.py`` and ``flask_app.py``.
"""
