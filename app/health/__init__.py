"""Health of the running service (API.md §5): /api/health, /livez, /readyz."""
