"""Recipes that reproduce a paper's claims with ccmem's methods (``ccmem repro``): unlike the generic harness in
:mod:`ccmem.eval`, each names the methods of its paper."""
