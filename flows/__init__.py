"""Prefect flows around pipeline/: the only package that imports Prefect."""
