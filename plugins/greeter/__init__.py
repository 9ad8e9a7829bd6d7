"""The greeter plugin: a config.yaml validated by a Config model."""
