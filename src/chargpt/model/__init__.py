"""The models: the GPT and the bigram baseline, what every model shares, its KV cache and costs."""
