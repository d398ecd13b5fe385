"""System logs and message delivery events."""
