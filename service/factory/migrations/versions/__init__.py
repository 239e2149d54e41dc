"""Alembic revisions of the factory's metadata (loaded by Alembic from their files)."""
