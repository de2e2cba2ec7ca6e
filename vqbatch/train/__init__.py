"""Training the small default model on the procedural shapes dataset."""
