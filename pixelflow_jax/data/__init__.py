"""Training data: image and captioned sources, the grain loader, the built-in demo sets, packing."""
