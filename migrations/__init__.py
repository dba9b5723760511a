"""Alembic migrations of the Flywheel schema; a package so the scripts install with the code."""
