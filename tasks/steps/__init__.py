"""The pipeline's steps as plain typed functions, one module each: fetch, validate, decode, separate,
score, publish (and encode, which publish uses). No Prefect here: `tasks.prefect_tasks` wraps them.
"""
