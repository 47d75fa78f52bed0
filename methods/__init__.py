"""Merge methods: small pure functions over float32 tensors, registered by recipe name."""
