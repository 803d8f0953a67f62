"""The datasets layer: A/B items and the shipped CAA sets. Depends on nothing but ``innsteer.core``'s errors."""
