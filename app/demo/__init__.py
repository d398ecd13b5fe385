"""Demo data for a first look and for benchmarks: ``flask demo seed``.

vocabulary.py  the names, subjects and SMTP errors every generator draws from
messages.py    queued messages in every state with their history (``seed_messages``), through
               the queue's bulk entry (``queue.bulk``)
bulk.py        the same on PostgreSQL for large counts, generated in the server
history.py     a year of delivery events and their rollup (``seed_history``)
cli.py         ``flask demo seed``
"""
