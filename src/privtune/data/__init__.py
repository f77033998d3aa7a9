"""The corpus: the generated notes, loaders of a user's own files, the tokenizer, canaries."""
