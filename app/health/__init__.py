"""Health of the running service (SPEC 5): /api/health, /livez, /readyz."""
