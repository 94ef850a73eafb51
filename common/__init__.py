"""What every layer may use: config loading with dotted overrides, atomic writes and checksums.

The lowest layer: it imports nothing from the project."""
