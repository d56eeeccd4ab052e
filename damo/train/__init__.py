"""DaMO's four training stages as chained Ray Train TorchTrainer runs."""
