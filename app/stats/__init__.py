"""Delivery statistics (SPEC 3): buckets of recipient outcomes from the hourly rollup."""
