"""Orchestration of one live migration: states, convergence, source and destination roles."""
