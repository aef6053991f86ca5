"""The policy as a network: its forward to token logprobs (chunked LM head), packed attention, MoE routing, the
MiniMax architecture, GGUF import and the tiny model of the default run."""
