"""One small file per method; :mod:`ccmem.registry` maps names to these classes."""
