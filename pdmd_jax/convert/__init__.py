"""Weight conversion between public checkpoints (diffusers/PEFT) and pdmd_jax param trees."""
