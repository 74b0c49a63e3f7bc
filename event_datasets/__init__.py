"""Real-data converters (MovieLens-100K, Open Bandit Dataset) and the synthetic Criteo-like generator.

Each writes impression and action logs in the layout of ``schemas.logs``.
"""
