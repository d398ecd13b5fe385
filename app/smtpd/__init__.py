"""The SMTP listener (API.md §11): aiosmtpd sessions -> relay policy -> the queue service."""
