"""Pipeline stages: one module per stage, each a Prefect task over files."""
