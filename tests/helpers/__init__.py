"""Shared test helpers (private brokers, agent subprocesses); reusable by every suite."""
