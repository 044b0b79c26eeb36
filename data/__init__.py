"""Everything between files on disk and a batch of integer arrays (pure numpy; never imports model or train).

Modules: `sources` (files -> documents, records), `tokenizer` (documents <-> ids), `batch` (the batch format and
its one padded-row constructor), `packing` (documents -> packed rows), `pretraining` (causal LM, masked LM, span
corruption rows), `finetuning` (instruction, seq2seq, classification rows), `pipeline` (config -> rows ->
resumable batches).
"""
