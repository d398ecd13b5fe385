"""Elemta's benchmark (`make bench`): measures the targets of API.md §13."""
