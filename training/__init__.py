"""Training a2e-lite: synthetic speech with exact phoneme timing, viseme
targets, augmentation and the training loop. Not needed to run the server."""
