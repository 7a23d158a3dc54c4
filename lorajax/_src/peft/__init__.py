"""Hugging Face PEFT adapter files: names and layout, writing, reading."""
