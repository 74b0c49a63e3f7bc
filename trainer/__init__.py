"""Training: the collisionless embedding table and its stores, optimizers, models, the online trainer."""
