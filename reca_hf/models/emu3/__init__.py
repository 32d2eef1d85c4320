"""Emu3 (`Emu3ForConditionalGeneration`, in transformers): the adapter and the tiny builder."""
