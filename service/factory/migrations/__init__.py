"""The factory's schema migrations (Alembic): `runner.py` runs them, `versions/` holds them."""
