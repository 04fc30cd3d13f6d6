"""The shared core every stage stands on: errors, file I/O, runtime helpers, registries, configs and
presets, datasets, models, BN statistics, augmentation and epoch plans, and the training loop. Nothing here
imports anything outside ``prismdd.core``."""
