"""Janus and Janus-Pro (`JanusForConditionalGeneration`, in transformers): the adapter and the tiny builders."""
