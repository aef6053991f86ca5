"""The algorithm as pure torch: the loss table, advantages, packing and micro-batches. Imports nothing of the
project and nothing but torch, so the loss runs and is tested on a laptop CPU."""
