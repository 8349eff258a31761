"""One small file per method, each registered with :func:`ccmem.registry.register`.

Importing this package registers the built-in methods; add a new method's module here.
"""

from ccmem.methods import ccm, full, gist  # noqa: F401 - imported to register them
