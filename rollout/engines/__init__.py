"""Engines that generate: in-process vLLM and HF generate, the fleet of vLLM servers, and what weights travel
through to reach them."""
