"""Helpers for developing pvt_dense itself (documentation generated from the tests); nothing a model needs."""
