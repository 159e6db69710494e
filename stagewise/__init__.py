"""Stagewise: one Prefect DAG from raw text to a promoted model."""

__version__ = "0.1.0"
