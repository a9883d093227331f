"""Code the tests share: tiny models and tokenizers, reference decoders, a running server.

Test modules import helpers from here and never from each other; fixtures live in the conftest.py of the
directory whose tests use them, so pytest finds them without imports.
"""
