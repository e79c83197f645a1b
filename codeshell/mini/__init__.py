"""codeshell-mini: a small CodeShell-architecture model built end to end by this project
(corpus, data pipeline, tokenizer, training), shipped as the default model. Not the 7B runtime."""
