"""The only package that touches transformers internals: attention registration and cache access."""
