"""Applications: the things a user runs. `AutoBridge` and live models (auto, live), `bridge verify`, `bridge push`
with its model card, and `bridge demo`. They are built on the converters, the model families, the nn / parallel /
training runtime and the core vocabulary, and nothing below imports them; `bridge.api` is their public face.
"""
