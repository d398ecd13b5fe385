"""Live streams over WebSocket (API.md §7): ``/api/logs/ws`` and ``/api/queue/ws``.

``hub`` watches the database and fans new rows out, ``sockets`` serves one WebSocket,
``routes`` declares the endpoints, ``frames`` holds the reads and the frame shapes,
``position`` the resume cursor. Operator notes: docs/STREAMS.md.
"""
