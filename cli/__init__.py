"""The superopt command."""
