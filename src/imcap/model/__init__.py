"""Model layer: encoder -> attributes -> decoder -> decoding -> Captioner (uses data and eval)."""
