"""Rows and prompts: loading the splits (load), mapping and checking rows (rows), prompts and the prompt stream
(prompts), and the embedded arithmetic task."""
