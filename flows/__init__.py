"""Prefect flows around pipeline/: the only package that imports Prefect."""

# The flows by name, without importing Prefect (the CLI offers them in --help): flows/flows.py
# defines `<name>_flow` for each, and FLOWS is built from this list.
FLOW_NAMES = ("nightly", "restore", "train", "evaluate", "challenge")
