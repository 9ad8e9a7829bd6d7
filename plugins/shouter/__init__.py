"""The shouter plugin: requires greeter, and declares a task."""
