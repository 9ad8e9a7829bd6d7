"""xcore's services: each subpackage reacts to events and appends new ones."""
