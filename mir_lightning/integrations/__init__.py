"""Adapters that locate MIR inputs (layers, image tokens, masks) inside third-party models."""
