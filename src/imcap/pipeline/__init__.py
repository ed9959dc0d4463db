"""Pipeline layer: feature cache, data module, callbacks and the entry points' functions (uses all)."""
