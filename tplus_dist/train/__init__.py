"""The training loop, its hooks and metrics. `tplus_dist.train.run.train(cfg)` runs a config."""
