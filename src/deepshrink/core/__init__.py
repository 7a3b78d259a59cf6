"""Bottom layer: errors, configs, registry, target profiles, atomic IO. Imports torch only."""
