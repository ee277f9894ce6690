"""A shop whose schema is managed by its own Alembic migrations, beside tasklet's."""
