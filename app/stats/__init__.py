"""Delivery statistics (API.md §3): buckets of recipient outcomes from the hourly rollup."""
