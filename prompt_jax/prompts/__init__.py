"""Prompt methods. Each method is one file; all plug into the model through `InputPrompt`."""
