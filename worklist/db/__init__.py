"""Typed SQLAlchemy models and the queries that need more than one line."""
