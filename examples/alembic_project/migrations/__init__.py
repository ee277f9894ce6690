"""The shop's Alembic scripts (a package only so type checkers tell its env.py apart)."""
