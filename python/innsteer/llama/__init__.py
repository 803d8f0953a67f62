"""The llama.cpp layer: GGUF export, the ctypes bindings of the native hook, the steering object
installed into llama-cpp-python, and A/B scoring through llama.cpp. ``innsteer.llama.export``
needs only ``gguf``; the other modules need llama-cpp-python (``pip install 'innsteer[llama]'``)."""
