"""Elemta's benchmark (`make bench`): measures the targets of SPEC section 13."""
