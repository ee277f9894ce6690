"""The shop's jobs (a worker runs them with ``--import shop.jobs``)."""

from __future__ import annotations

from tasklet import job


@job(queue="email")
def send_receipt(order_id: int) -> None:
    # A real job would render the receipt and mail it.
    ...
