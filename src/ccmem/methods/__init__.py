"""One small file per method, each registered with :func:`ccmem.registry.register`.

Importing this package registers the built-in methods; add a new method's module here.
"""

from ccmem.methods import (  # noqa: F401 - imported to register them
    ccm,
    expected_attention,
    full,
    gist,
    h2o,
    icformer,
    knorm,
    local,
    reasoning,
    scattered,
    sentinel,
    snapkv,
    streaming,
    tova,
)
