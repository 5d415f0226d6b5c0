"""The lecture's ladder: its rungs as data, the runner that trains each rung, and the report."""
