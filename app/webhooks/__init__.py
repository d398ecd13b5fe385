"""Signed webhooks (docs/WEBHOOKS.md): receivers, the event feed and the dispatcher."""
