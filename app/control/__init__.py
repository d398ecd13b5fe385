"""Delivery control: destination policies with shared limits, adaptive backoff, the
suppression list and time-limited rules (docs/DELIVERY.md, "Delivery control").

Owns ``delivery_policies``, ``connection_slots``, ``rate_counters``, ``destination_backoff``,
``suppressions`` and ``rules``. Queued mail is changed only through ``app/queue``'s verbs.
"""
