"""The application's database: one engine for its own tables and for tasklet's jobs.

Sharing the engine is what makes ``send_welcome.options(connection=session).defer()``
part of the signup's transaction.
"""

from __future__ import annotations

import datetime as dt
import os

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import tasklet

# SQLite file next to the app by default; e.g. postgresql://app@db/app in production.
URL = os.environ.get("TASKLET_DATABASE_URL", "sqlite:///signup.db")
# A plain postgresql:// means psycopg 3 here, as it does for tasklet.
engine = sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
Session = sessionmaker(engine)
tasklet.configure(engine=engine)


def use(new_engine: sa.Engine) -> None:
    """Point the app and tasklet at another database (tests do, see test_signup.py)."""
    global engine
    engine = new_engine
    Session.configure(bind=new_engine)
    tasklet.configure(engine=new_engine)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    welcomed_at: Mapped[dt.datetime | None]


def create_tables() -> None:
    """tasklet's tables and the app's. A real project runs migrations at deploy instead
    (``tasklet migrate``, or Alembic: see examples/alembic_project)."""
    tasklet.upgrade()
    Base.metadata.create_all(engine)
