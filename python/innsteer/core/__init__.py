"""The core layer: the flow, the steerers, training and the steering methods. Depends on
``innsteer_ext`` (the compiled ops) and nothing above it."""
