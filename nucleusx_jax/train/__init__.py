"""Pretraining: the data pipeline (:mod:`.data`), tokenizers (:mod:`.tokenizer`) and the trainer."""
