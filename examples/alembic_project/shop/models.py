"""The shop's tables, and the engine it shares with tasklet."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tasklet

URL = os.environ.get("TASKLET_DATABASE_URL", "sqlite:///shop.db")
engine = sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
tasklet.configure(engine=engine)


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customers.id"))
    total_cents: Mapped[int]
