"""Text in and out: the character tokenizer, reading a user's UTF-8 files, and ids back to text."""
