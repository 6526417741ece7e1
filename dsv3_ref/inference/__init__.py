"""Inference: KV-cached generation and sampling (`generate`) and self-speculative decoding with the MTP module
(`speculative`)."""
