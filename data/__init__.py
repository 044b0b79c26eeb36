"""Everything between files on disk and a batch of integer arrays (pure numpy; never imports jax, model, train).

Modules: `sources` (files -> documents), `tokenizer` (documents <-> ids), `pipeline` (ids -> packed rows ->
resumable batches).
"""
