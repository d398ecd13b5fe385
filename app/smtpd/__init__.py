"""The SMTP listener (SPEC 11): aiosmtpd sessions -> relay policy -> the queue service."""
