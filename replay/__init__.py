"""The replay tool: inspect and debug a copy of an xcore event log."""
