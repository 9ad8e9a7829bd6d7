"""The sandbox supervisor: sandboxed plugins run in limited worker processes (docs/sandbox.md)."""
