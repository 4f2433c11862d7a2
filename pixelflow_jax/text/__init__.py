"""Text conditioning: the T5 encoder, its tokenizer and prompt encoding, and the encoders of training runs."""
